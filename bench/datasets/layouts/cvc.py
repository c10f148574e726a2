"""The CVC polyp sets and ETIS, as their publishers ship them (the PraNet png layout as fallback).

- CVC-ClinicDB (Bernal et al. 2015): ``Original/N.tif`` + ``Ground Truth/N.tif``; the mirror that
  ships ``PNG/`` and ``TIF/`` below its root is read from ``TIF/`` (the released format).
- CVC-ColonDB (Bernal et al. 2012): one folder of ``N.tiff`` (a few ``N.tif``; ``N.bmp`` in the
  original release) + ``pN`` polyp masks; ``cpN`` / ``cN`` contours and ``sN`` non-informative
  region masks are not used.
- ETIS-LaribPolypDB (Silva et al. 2014): ``ETIS-LaribPolypDB/N.tif`` + ``Ground Truth/pN.tif``.
"""

from __future__ import annotations

from pathlib import Path

from bench.datasets.layouts.common import (
    SEEDED,
    Layout,
    Scan,
    by_key,
    few,
    images,
    pair,
    regex_key,
    scan_image_masks,
    stem,
    subdir,
)

_GT = ("Ground Truth", "GroundTruth", "Ground_Truth")
_PRANET = "or the PraNet images/N.png + masks/N.png"
_EXT = r"\.(?:tiff?|bmp|png)"

# ----------------------------------------------------------------------------------------------
# CVC-ClinicDB

CLINICDB_EXPECTS = f"Original/N.tif + Ground Truth/N.tif (also below PNG/ or TIF/), {_PRANET}"


def _is_original(root: Path) -> bool:
    return subdir(root, "Original") is not None and subdir(root, *_GT) is not None


def _format_folder(root: Path) -> Path | None:
    """TIF/ (preferred) or PNG/ below the root, holding Original + Ground Truth."""
    for name in ("TIF", "TIFF", "PNG"):
        folder = subdir(root, name)
        if folder is not None and _is_original(folder):
            return folder
    return None


def is_clinicdb(root: Path) -> bool:
    return _is_original(root) or _format_folder(root) is not None


def scan_cvc_clinicdb(root: Path) -> Scan:
    notes = []
    folder = root if _is_original(root) else _format_folder(root)
    if folder is None:
        return scan_image_masks(root, "cvc-clinicdb", "auto", CLINICDB_EXPECTS)
    if folder is not root:
        others = [p.name for p in root.iterdir() if p.is_dir() and p != folder and _is_original(p)]
        if others:
            notes.append(f"{folder.name}/ used; {', '.join(others)}/ holds the same frames in another format")
    image_dir, mask_dir = subdir(folder, "Original"), subdir(folder, *_GT)
    found = by_key(images(image_dir), stem, "cvc-clinicdb", image_dir)
    masks = by_key(images(mask_dir), stem, "cvc-clinicdb", mask_dir)
    return Scan("cvc-clinicdb", root, pair("cvc-clinicdb", found, masks, image_dir, mask_dir), "auto", notes=notes)


# ----------------------------------------------------------------------------------------------
# CVC-ColonDB

_COLON_IMAGE = regex_key(rf"(\d+){_EXT}")
_COLON_MASK = regex_key(rf"p(\d+){_EXT}")
_COLON_UNUSED = regex_key(rf"((?:cp|c|s)\d+){_EXT}")   # contours, non-informative regions
COLONDB_EXPECTS = f"one folder of N.tiff (or N.tif, N.bmp) + pN.tiff mask (+ cpN contour, ignored), {_PRANET}"


def is_colondb(root: Path) -> bool:
    files = [p for p in root.iterdir() if p.is_file()]
    return any(_COLON_IMAGE(p) for p in files) and any(_COLON_MASK(p) for p in files)


def scan_cvc_colondb(root: Path) -> Scan:
    if not is_colondb(root):
        return scan_image_masks(root, "cvc-colondb", "auto", COLONDB_EXPECTS)
    files = images(root)
    found = by_key(files, _COLON_IMAGE, "cvc-colondb", root)
    masks = by_key(files, _COLON_MASK, "cvc-colondb", root)
    scan = Scan("cvc-colondb", root, pair("cvc-colondb", found, masks, root, root), "auto")
    other = [p.name for p in files if not (_COLON_IMAGE(p) or _COLON_MASK(p) or _COLON_UNUSED(p))]
    if other:
        scan.notes.append(f"{len(other)} other image file(s) not used: {few(other)}")
    return scan


# ----------------------------------------------------------------------------------------------
# ETIS-LaribPolypDB

ETIS_EXPECTS = f"ETIS-LaribPolypDB/N.tif + Ground Truth/pN.tif, {_PRANET}"


def is_etis(root: Path) -> bool:
    return subdir(root, "ETIS-LaribPolypDB") is not None and subdir(root, *_GT) is not None


def scan_etis(root: Path) -> Scan:
    if not is_etis(root):
        return scan_image_masks(root, "etis-laribpolypdb", "auto", ETIS_EXPECTS)
    image_dir, mask_dir = subdir(root, "ETIS-LaribPolypDB"), subdir(root, *_GT)
    found = by_key(images(image_dir), regex_key(rf"(\d+){_EXT}"), "etis-laribpolypdb", image_dir)
    masks = by_key(images(mask_dir), regex_key(rf"p(\d+){_EXT}"), "etis-laribpolypdb", mask_dir)
    return Scan("etis-laribpolypdb", root, pair("etis-laribpolypdb", found, masks, image_dir, mask_dir), "auto")


LAYOUTS = [
    Layout("cvc-colondb", "CVC-ColonDB", COLONDB_EXPECTS, SEEDED, is_colondb, scan_cvc_colondb, priority=40,
           hints=("colondb",)),
    Layout("cvc-clinicdb", "CVC-ClinicDB", CLINICDB_EXPECTS, SEEDED, is_clinicdb, scan_cvc_clinicdb, priority=50,
           hints=("clinicdb", "cvc612")),
    Layout("etis-laribpolypdb", "ETIS-LaribPolypDB", ETIS_EXPECTS, SEEDED, is_etis, scan_etis, priority=60,
           hints=("etis",)),
]
