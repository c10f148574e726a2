"""Kvasir-SEG (Jha et al., MMM 2020): ``images/NAME.jpg`` + ``masks/NAME.jpg``, 3-channel JPEG masks.

The official 880/120 split (Jha et al., IEEE Access 2021) applies when the folder holds the 1000
released pairs; otherwise the split is seeded and a note says why.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.datasets.kvasir_split import KVASIR_SEG_N_PAIRS, KVASIR_SEG_TEST_IDS
from bench.datasets.layouts.common import SEEDED, Layout, Pair, Scan, hint, images, pair_dirs, scan_image_masks

KVASIR_ID = re.compile(r"c[a-z0-9]{24}")
EXPECTS = "images/NAME.jpg + masks/NAME.jpg"


def looks_like_kvasir(root: Path) -> bool:
    dirs = pair_dirs(root)
    if dirs is None:
        return False
    if hint(root, "kvasir"):
        return True
    stems = [p.stem for p in images(dirs[0])]
    return bool(stems) and all(KVASIR_ID.fullmatch(s) for s in stems)


def scan_kvasir_seg(root: Path) -> Scan:
    """Kvasir-SEG; the official 880/120 split when the folder holds the 1000 released pairs."""
    scan = scan_image_masks(root, "kvasir-seg", "auto", EXPECTS)
    ids = {pair.id for pair in scan.pairs}
    if len(ids) == KVASIR_SEG_N_PAIRS and KVASIR_SEG_TEST_IDS <= ids:
        scan.pairs = [Pair(p.id, p.image, p.mask, "test" if p.id in KVASIR_SEG_TEST_IDS else "train", p.extra)
                      for p in scan.pairs]
        scan.official = True
    else:
        scan.notes.append(f"{len(ids)} pairs, not the 1000 of the Kvasir-SEG release with its official "
                          "880/120 split (Jha et al.): a seeded split is used")
    return scan


LAYOUTS = [Layout("kvasir-seg", "Kvasir-SEG", EXPECTS,
                  f"official split 880/120 (Jha et al.) for the full release, else {SEEDED}", looks_like_kvasir,
                  scan_kvasir_seg, priority=70)]
