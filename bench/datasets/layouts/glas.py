"""GlaS (Warwick QU release, Sirinukunwattana et al. 2017): ``train_N.bmp`` + ``train_N_anno.bmp``,
``testA_N`` / ``testB_N`` likewise; official split train 85 / test 80 (testA + testB). Masks are
instance labels (rule ``label``: nonzero is gland). Mirrors that ship ``img/`` + ``labelcol/``
(in ``train/``, ``test/`` or ``Train_Folder/``-style folders) are read too; the split follows the
GlaS file names where they are kept, else the folders.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.datasets.layouts.common import (
    Layout,
    Pair,
    Scan,
    by_key,
    has_image_masks,
    hint,
    images,
    not_layout,
    pair,
    pair_dirs,
    regex_key,
    scan_image_masks,
    split_folders,
)

_IMAGE = regex_key(r"((?:train|testA|testB)_\d+)\.(?:bmp|png|jpg|tif)")
_MASK = regex_key(r"((?:train|testA|testB)_\d+)_anno\.(?:bmp|png|jpg|tif)")
_NAME = re.compile(r"(?:train|testA|testB)_\d+", re.IGNORECASE)
EXPECTS = "train_N.bmp + train_N_anno.bmp, testA_N / testB_N likewise (or img/ + labelcol/ mirrors)"


def _is_warwick(root: Path) -> bool:
    return any(_IMAGE(p) for p in root.iterdir() if p.is_file())


def _image_dirs(root: Path) -> list[Path]:
    holders = [root] if pair_dirs(root) else list(split_folders(root).values())
    return [pair_dirs(h)[0] for h in holders if pair_dirs(h)]


def _is_mirror(root: Path) -> bool:
    """Image/mask folders whose images keep the GlaS names, or ``labelcol/`` masks under a folder named GlaS."""
    if not has_image_masks(root):
        return False
    stems = [p.stem for d in _image_dirs(root) for p in images(d)]
    if stems and all(_NAME.fullmatch(s) for s in stems):
        return True
    labelcol = any(p.name.lower() == "labelcol" for d in _image_dirs(root) for p in d.parent.iterdir())
    return labelcol and hint(root, "glas", "warwick")


def is_glas(root: Path) -> bool:
    return _is_warwick(root) or _is_mirror(root)


def _by_name(scan: Scan) -> Scan:
    """Official roles from the GlaS names (train_N / testA_N / testB_N), when every id keeps one."""
    names = [p.id.rsplit("/", 1)[-1] for p in scan.pairs]
    if names and all(_NAME.fullmatch(n) for n in names):
        scan.pairs = [Pair(p.id, p.image, p.mask, "train" if n.lower().startswith("train") else "test", p.extra)
                      for p, n in zip(scan.pairs, names, strict=True)]
        scan.official = True
        scan.notes = [n for n in scan.notes if "split by seed" not in n]
    return scan


def scan_glas(root: Path) -> Scan:
    if not _is_warwick(root):
        if not has_image_masks(root):
            raise not_layout(root, "glas", EXPECTS)
        return _by_name(scan_image_masks(root, "glas", "label", EXPECTS))
    files = images(root)
    found = by_key(files, _IMAGE, "glas", root)
    masks = by_key(files, _MASK, "glas", root)
    return _by_name(Scan("glas", root, pair("glas", found, masks, root, root), "label"))


LAYOUTS = [Layout("glas", "GlaS (Warwick QU)", EXPECTS, "official split train 85 / test 80 (testA + testB)",
                  is_glas, scan_glas, priority=20)]
