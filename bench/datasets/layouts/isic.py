"""ISIC 2016 / 2017 / 2018 lesion segmentation (Codella et al.), in the challenge folders or one flat folder.

``ISIC_xxxxxxx.jpg`` + ``ISIC_xxxxxxx_Segmentation.png`` (``_segmentation`` from 2017). Training +
Test folders give the official split; where the test ground truth is missing, Validation serves
as test; 2017's ``_superpixels`` files and the tasks 2/3 folders are not segmentation and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.datasets.layouts.common import SEEDED, Layout, Pair, Scan, by_key, images, not_layout, pair, regex_key
from bench.errors import BenchError

_IMAGE = regex_key(r"(ISIC_\d+)\.(?:jpg|jpeg|png)")
_MASK = regex_key(r"(ISIC_\d+)_segmentation\.png")
_YEARS = {"isbi2016": "isic-2016", "isic2016": "isic-2016", "isic2017": "isic-2017", "isic2018": "isic-2018"}


def _role(name: str) -> str | None:
    lowered = name.lower()
    for word, role in (("train", "train"), ("valid", "validation"), ("test", "test")):
        if word in lowered:
            return role
    return None


def _folders(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Data and ground-truth folders by role, from ``root`` and its sub-folders (one level down)."""
    candidates = [p for p in root.iterdir() if p.is_dir()]
    candidates += [q for p in candidates for q in p.iterdir() if q.is_dir()]
    data: dict[str, Path] = {}
    truth: dict[str, Path] = {}
    for folder in sorted(candidates):
        name, role = folder.name.lower(), _role(folder.name)
        other_task = any(word in name for word in ("part2", "part3", "task2", "task3"))  # not segmentation
        if role is None or other_task or not name.startswith(("isic", "isbi")):
            continue
        target = truth if "groundtruth" in name else data if name.endswith(("_data", "_input")) else None
        if target is None:
            continue
        if role in target:
            raise BenchError(f"isic: two {role} folders ({target[role]} and {folder}); keep one")
        target[role] = folder
    return data, truth


def isic_year(root: Path) -> str:
    data, truth = _folders(root)
    for folder in [root, *data.values(), *truth.values()]:
        compact = re.sub(r"[^a-z0-9]", "", folder.name.lower())
        for prefix, layout in _YEARS.items():
            if compact.startswith(prefix):
                return layout
    return "isic"


def _flat(root: Path) -> bool:
    files = [p for p in root.iterdir() if p.is_file()]
    return any(_IMAGE(p) for p in files) and any(_MASK(p) for p in files)


def is_isic(root: Path) -> bool:
    data, truth = _folders(root)
    return bool(set(data) & set(truth)) or _flat(root)


def _pairs(data_dir: Path, truth_dir: Path, layout: str, role: str | None) -> list[Pair]:
    found = by_key(images(data_dir), _IMAGE, layout, data_dir)
    masks = by_key(images(truth_dir), _MASK, layout, truth_dir)
    return pair(layout, found, masks, data_dir, truth_dir, role)


def scan_isic(root: Path, layout: str | None = None) -> Scan:
    """Training (+ Test) challenge folders → official split; Validation serves as test if no Test."""
    data, truth = _folders(root)
    layout = layout if layout not in (None, "isic") else isic_year(root)
    roles = [r for r in ("train", "validation", "test") if r in data and r in truth]
    if not roles:
        if not _flat(root):
            raise not_layout(root, layout, EXPECTS)
        return Scan(layout, root, _pairs(root, root, layout, None), "auto")
    scan = Scan(layout, root, [], "auto")
    scan.notes += [f"{folder.name} has no ground-truth folder: not used" for r, folder in data.items()
                   if r not in truth]
    scan.notes += [f"{folder.name} has no image folder: not used" for r, folder in truth.items() if r not in data]
    test_role = "test" if "test" in roles else "validation" if "validation" in roles else None
    if "train" in roles and test_role is not None:
        scan.official = True
        if test_role == "validation":
            scan.notes.append(f"no test ground truth: {data['validation'].name} serves as the test split")
        elif "validation" in roles:
            scan.notes.append(f"{data['validation'].name} (validation) not used: the protocol has no "
                              "validation step")
        used = {"train": "train", test_role: "test"}
    else:  # no training part, or nothing to test on: one pool, split by seed
        used = {role: None for role in roles}
        scan.notes.append(f"no official train/test pair of folders: {', '.join(data[r].name for r in roles)} "
                          "split by seed")
    for role, split_role in used.items():
        scan.pairs += _pairs(data[role], truth[role], layout, split_role)
    ids = [p.id for p in scan.pairs]
    if len(set(ids)) != len(ids):
        raise BenchError(f"{layout}: the same ISIC id appears in two folders of {root}; remove the duplicate")
    return scan


EXPECTS = "the challenge folders, or one folder of ISIC_x.jpg + ISIC_x_segmentation.png"
LAYOUTS = [
    Layout("isic-2016", "ISIC 2016 part 1", "ISBI2016_ISIC_Part1_{Training,Test}_Data + ..._GroundTruth "
           "(ISIC_x.jpg + ISIC_x_Segmentation.png)", "official split 900/379", is_isic,
           lambda root: scan_isic(root, "isic-2016"), priority=31),
    Layout("isic-2017", "ISIC 2017 part 1", "ISIC-2017_{Training,Validation,Test_v2}_Data + "
           "..._Part1_GroundTruth", "official split 2000/600 (validation unused)", is_isic,
           lambda root: scan_isic(root, "isic-2017"), priority=32),
    Layout("isic-2018", "ISIC 2018 task 1", "ISIC2018_Task1-2_{Training,Validation,Test}_Input + "
           "ISIC2018_Task1_{...}_GroundTruth", "official test folder if present, else validation as test",
           is_isic, lambda root: scan_isic(root, "isic-2018"), priority=33),
    Layout("isic", "ISIC of any year", EXPECTS, f"official where the folders give one, else {SEEDED}", is_isic,
           scan_isic, priority=30, name_for=isic_year),
]
