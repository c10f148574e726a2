"""The PraNet polyp benchmark download (Fan et al., MICCAI 2020), recognised at its root.

``TrainDataset/{image,mask}`` (or ``images``/``masks``): 900 Kvasir-SEG + 550 CVC-ClinicDB training
pairs; ``TestDataset/<Name>/{images,masks}`` for ``Kvasir`` (100), ``CVC-ClinicDB`` (62),
``CVC-ColonDB`` (380), ``ETIS-LaribPolypDB`` (196) and ``CVC-300`` (60). The root read as one
dataset has the official split TrainDataset / all of TestDataset (ids ``part/name``); its parts are
``train`` and each test folder's name, addressed as ``pranet:ROOT#Kvasir`` (see docs/datasets.md).
"""

from __future__ import annotations

from pathlib import Path

from bench.datasets.layouts.common import Layout, Pair, Scan, child_dirs, not_layout, pair_dirs, scan_pair_dirs, subdir

TRAIN = "train"
# Test parts whose training images are in TrainDataset: "seen" in the generalisation protocol
SEEN_PARTS = ("kvasir", "cvc-clinicdb")
EXPECTS = "TrainDataset/{image,mask} and/or TestDataset/<Name>/{images,masks}"


def parts(root: Path) -> dict[str, Path]:
    """Part name → folder: ``train`` (TrainDataset) and one per TestDataset sub-folder."""
    found: dict[str, Path] = {}
    train = subdir(root, "TrainDataset")
    if train is not None and pair_dirs(train) is not None:
        found[TRAIN] = train
    test = subdir(root, "TestDataset")
    if test is not None:
        found.update({child.name: child for child in child_dirs(test) if pair_dirs(child) is not None})
    return found


def is_pranet(root: Path) -> bool:
    has_folder = subdir(root, "TrainDataset") is not None or subdir(root, "TestDataset") is not None
    return has_folder and bool(parts(root))


def is_seen(part: str) -> bool:
    return part.lower() in SEEN_PARTS


def scan_pranet(root: Path) -> Scan:
    found = parts(root)
    if not found:
        raise not_layout(root, "pranet", EXPECTS)
    scan = Scan("pranet", root, [], "auto")
    for part, folder in found.items():
        role = "train" if part == TRAIN else "test"
        pairs, notes = scan_pair_dirs(folder, "pranet", role)
        scan.pairs += [Pair(f"{part}/{p.id}", p.image, p.mask, role, p.extra) for p in pairs]
        scan.notes += notes
        scan.parts[part] = len(pairs)
    scan.official = TRAIN in found and len(found) > 1
    return scan


LAYOUTS = [Layout("pranet", "PraNet polyp benchmark", EXPECTS,
                  "official: TrainDataset for training, each TestDataset folder a test set (parts: #train, #Kvasir, "
                  "#CVC-ClinicDB, #CVC-ColonDB, #ETIS-LaribPolypDB, #CVC-300)", is_pranet, scan_pranet, priority=10,
                  parts=parts)]
