"""Native folder layouts of the public segmentation sets: a registry of one module per family (docs/datasets.md).

Every layout is read as its publisher ships it (file names exactly as released); the modules of this
package each register theirs in a module-level ``LAYOUTS`` list:

==================  =====================================================================
pranet              ``TrainDataset/{image,mask}`` + ``TestDataset/<Name>/{images,masks}``
glas                Warwick: ``train_N.bmp`` + ``train_N_anno.bmp``, ``testA_N`` / ``testB_N``; ``img/`` +
                    ``labelcol/`` mirrors
isic-2016/17/18     ``ISIC_xxxxxxx.jpg`` + ``ISIC_xxxxxxx_Segmentation.png`` in the challenge folders
cvc-colondb         one folder: ``N.tiff`` (or ``.tif``, ``.bmp``) image, ``pN`` mask, ``cpN`` contour (ignored)
cvc-clinicdb        ``Original/N.tif`` + ``Ground Truth/N.tif`` (also below ``PNG/`` / ``TIF/``)
etis-laribpolypdb   ``ETIS-LaribPolypDB/N.tif`` + ``Ground Truth/pN.tif``
kvasir-seg          ``images/NAME.jpg`` + ``masks/NAME.jpg`` (3-channel JPEG masks)
generic             ``images/`` + ``masks/`` paired by stem, and their variants (see ``generic``)
==================  =====================================================================

Adding a layout is one file here: a module with a ``LAYOUTS`` list of ``Layout`` records (name,
what it expects, ``detect(root)``, ``scan(root) -> Scan``, a recognition ``priority``).
Recognition tries the layouts by priority, then folder-name hints for plain image/mask folders
(the PraNet png copies of ClinicDB, ColonDB, ETIS), then ``generic``. A download wrapped in
single folders (``Kvasir-SEG/Kvasir-SEG/...``) is looked into; a folder holding several datasets,
or nothing recognisable, is an error that says what it found and which path to pass.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from pathlib import Path

from bench.datasets.layouts.common import (
    IMAGE_EXTENSIONS,
    Layout,
    Pair,
    Scan,
    child_dirs,
    few,
    has_image_masks,
    hint,
    is_image,
)
from bench.datasets.splits import natural_key
from bench.errors import BenchError

__all__ = ["LAYOUTS", "Layout", "Pair", "Scan", "recognise", "scan", "find_part", "check_folder", "pool_files"]

FALLBACK = 1000       # priority from which a layout is a fallback, tried after the folder-name hints
MAX_WRAPPERS = 5      # single-folder wrappers looked into (Kvasir-SEG/Kvasir-SEG/...)


def _discover() -> dict[str, Layout]:
    found: list[Layout] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name != "common":
            found += getattr(importlib.import_module(f"{__name__}.{module.name}"), "LAYOUTS", [])
    return {layout.name: layout for layout in sorted(found, key=lambda lay: (lay.priority, lay.name))}


LAYOUTS: dict[str, Layout] = _discover()


def recognise(root: Path) -> str | None:
    """The layout of ``root`` itself (no looking into sub-folders), or None."""
    for layout in LAYOUTS.values():
        if layout.priority < FALLBACK and layout.detect(root):
            return layout.name_for(root) if layout.name_for else layout.name
    if has_image_masks(root):
        for layout in LAYOUTS.values():
            if layout.hints and hint(root, *layout.hints):
                return layout.name
    for layout in LAYOUTS.values():
        if layout.priority >= FALLBACK and layout.detect(root):
            return layout.name
    return None


def check_folder(root: Path) -> None:
    if not root.exists():
        raise BenchError(f"dataset folder {root} does not exist; check the path (bench datasets lists the layouts)")
    if not root.is_dir():
        raise BenchError(f"{root} is a file, not a dataset folder; pass the folder that holds the images")


def _unwrap(root: Path) -> Path | None:
    """The single sub-folder of ``root`` (a zip's wrapper folder), ignoring hidden and __MACOSX."""
    children = child_dirs(root)
    loose = [p for p in root.iterdir() if is_image(p)]
    return children[0] if len(children) == 1 and not loose else None


def _chain(root: Path) -> list[Path]:
    """``root`` and the single-folder wrappers below it."""
    chain = [root]
    while len(chain) <= MAX_WRAPPERS and (inner := _unwrap(chain[-1])) is not None:
        chain.append(inner)
    return chain


def _first_recognised(root: Path) -> tuple[str, Path] | None:
    for level in _chain(root):
        found = recognise(level)
        if found is not None:
            return found, level
    return None


def _describe(folder: Path) -> str:
    files = [p for p in folder.iterdir() if is_image(p)]
    if files:
        kinds = Counter(p.suffix.lower() for p in files)
        example = sorted((p.name for p in files), key=natural_key)[0]
        return f"{len(files)} image(s) {'/'.join(sorted(kinds))}, e.g. {example}"
    subs = child_dirs(folder)
    return f"{len(subs)} sub-folder(s)" if subs else "no images"


def _unrecognised(root: Path, given: Path) -> BenchError:
    children = child_dirs(root)
    datasets = [(c, found) for c in children if (found := _first_recognised(c)) is not None]
    if len(datasets) > 1:
        listed = ", ".join(f"{c.name}/ ({name})" for c, (name, _) in datasets)
        also = f", or the PraNet root as pranet:{root.parent}" if root.name.lower() == "testdataset" else ""
        return BenchError(f"{root} holds several datasets: {listed}; pass one of them, e.g. "
                          f"{datasets[0][0]}{also}")
    loose = [p for p in root.iterdir() if is_image(p)]
    seen = "; ".join(f"{c.name}/ ({_describe(c)})" for c in children[:6])
    seen += f" and {len(children) - 6} more" if len(children) > 6 else ""
    found = f"sub-folders {seen}" if children else "no sub-folders"
    found += f"; {len(loose)} image(s) at the top ({few(sorted(p.name for p in loose), 3)})" if loose else ""
    tried = "; ".join(f"{lay.name} ({lay.expects})" for lay in LAYOUTS.values() if not lay.name.startswith("isic-"))
    where = f"{given} (looked into {root.relative_to(given)})" if root != given else f"{root}"
    return BenchError(f"folder layout of {where} not recognised: found {found}. Tried {tried}. Arrange the files "
                      "as one of these, pass the folder that holds them, or name the layout as LAYOUT:PATH")


def _locate(root: Path) -> tuple[str, Path, list[str]]:
    """(layout, folder, notes) for a folder given without a layout name."""
    found = _first_recognised(root)
    if found is not None:
        name, folder = found
        return name, folder, [f"read from {folder.relative_to(root)} inside {root}"] if folder != root else []
    chain = _chain(root)
    inner = chain[-1]
    candidates = [(c, f) for c in child_dirs(inner) if (f := _first_recognised(c)) is not None]
    loose = [p for p in inner.iterdir() if is_image(p)]
    if len(candidates) == 1 and not loose:   # one dataset beside other folders: use it, and say so
        child, (name, folder) = candidates[0]
        others = [c.name for c in child_dirs(inner) if c != child]
        return name, folder, [f"read {folder.relative_to(root)} ({name}), the only dataset in {root}; "
                              f"not used: {few(others)}"]
    raise _unrecognised(inner, root)


def scan(root: Path, layout: str | None = None) -> Scan:
    """Pairs of ``root`` read as ``layout`` (recognised from the folder when None)."""
    check_folder(root)
    notes: list[str] = []
    if layout is None:
        layout, root, notes = _locate(root)
    if layout not in LAYOUTS:
        raise BenchError(f"unknown dataset layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")
    result, errors = None, []
    for level in _chain(root):   # a named layout on a wrapper folder: look inside
        try:
            result = LAYOUTS[layout].scan(level)
            break
        except BenchError as err:
            errors.append(err)
    if result is None:
        raise errors[0]
    if not result.pairs:
        raise BenchError(f"{layout} at {result.root}: no image/mask pairs found; expected {LAYOUTS[layout].expects}")
    result.notes = notes + result.notes
    return result


def find_part(root: Path, layout: str | None, part: str) -> tuple[str, Path]:
    """(part name, folder) of a layout made of parts (``pranet:ROOT#Kvasir``)."""
    check_folder(root)
    if layout is None:
        layout, root, _ = _locate(root)
    else:
        root = next((level for level in _chain(root) if LAYOUTS[layout].detect(level)), root)
    parts_of = LAYOUTS[layout].parts
    if parts_of is None:
        raise BenchError(f"{layout} has no parts; drop '#{part}' (parts exist for: "
                         f"{', '.join(n for n, lay in LAYOUTS.items() if lay.parts)})")
    found = parts_of(root)
    wanted = part.strip().lower()
    for name, folder in found.items():
        if name.lower() == wanted or (name == "train" and wanted == "traindataset"):
            return name, folder
    raise BenchError(f"{root} has no part {part!r}; its parts: {', '.join(found) or 'none'} "
                     f"(use e.g. {layout}:{root}#{next(iter(found), 'NAME')})")


def pool_files(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursively), in natural order of the relative path."""
    check_folder(root)
    files = [p for p in root.rglob("*") if is_image(p) and not any(part.startswith((".", "__MACOSX"))
                                                                  for part in p.relative_to(root).parts)]
    if not files:
        raise BenchError(f"pool folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                         "pass a folder of unlabelled images")
    return sorted(files, key=lambda p: natural_key(p.relative_to(root).as_posix()))
