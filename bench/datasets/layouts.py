"""Native folder layouts of the public segmentation sets: recognition, pairing, decoding (DESIGN.md §4).

Every layout is read as its publisher ships it (file names exactly as released):

==================  =====================================================================
kvasir-seg          ``images/NAME.jpg`` + ``masks/NAME.jpg`` (3-channel JPEG masks)
cvc-clinicdb        ``Original/N.tif`` + ``Ground Truth/N.tif``, or PraNet ``images/N.png`` + ``masks/N.png``
cvc-colondb         one folder: ``N.tiff`` image, ``pN.tiff`` mask, ``cpN.tiff`` contour (ignored);
                    a few frames are ``N.tif``; or the PraNet png layout
etis-laribpolypdb   ``ETIS-LaribPolypDB/N.tif`` + ``Ground Truth/pN.tif``, or the PraNet png layout
glas                Warwick: ``train_N.bmp`` + ``train_N_anno.bmp``, ``testA_N`` / ``testB_N`` likewise
isic-2016/17/18     ``ISIC_xxxxxxx.jpg`` + ``ISIC_xxxxxxx_Segmentation.png`` in the challenge folders
                    (``ISBI2016_ISIC_Part1_Training_Data`` + ``..._Training_GroundTruth``, ...)
generic             ``images/`` + ``masks/`` paired by file stem, any common image extension
==================  =====================================================================

Decoding: images are read with PIL (``tifffile`` for TIFFs PIL cannot read) and converted to RGB;
masks are binarised explicitly at full resolution (``threshold``: ≥ half of full scale, 128 for
8-bit, on the mean of the colour channels; ``label``: > 0, for GlaS instance labels; ``auto``
(generic): labels when the mask's maximum is ≤ 1, else the threshold). Both are then resized to
S×S without keeping the aspect ratio (the polyp-benchmark convention): images bilinear with
antialiasing (Pillow's resize filters scale their support when reducing), masks by area
averaging (Pillow BOX on the 0/1 mask) thresholded at 0.5.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.datasets.kvasir_split import KVASIR_SEG_N_PAIRS, KVASIR_SEG_TEST_IDS
from bench.datasets.splits import natural_key
from bench.errors import BenchError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")
TIFF_EXTENSIONS = (".tif", ".tiff")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Pair:
    """One image and its mask; ``role`` is "train" or "test" where the layout defines the split."""

    id: str
    image: Path
    mask: Path
    role: str | None = None


@dataclass
class Scan:
    """The pairs found in a folder, before decoding (cheap: listing only)."""

    layout: str
    root: Path
    pairs: list[Pair]
    mask_rule: str                       # "threshold" | "label" | "auto"
    official: bool = False               # pairs carry the official train/test roles
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [path for pair in self.pairs for path in (pair.image, pair.mask)]


# ----------------------------------------------------------------------------------------------
# Folder helpers


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: natural_key(p.name))


def _subdir(root: Path, *names: str) -> Path | None:
    """The first child folder of ``root`` whose name matches one of ``names`` (case-insensitive)."""
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for name in names:
        if name.lower() in children:
            return children[name.lower()]
    return None


def _few(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def _by_key(files: list[Path], key: Callable[[Path], str | None], layout: str, folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        k = key(path)
        if k is None:
            continue
        if k in out:
            raise BenchError(f"{layout}: {out[k].name} and {path.name} in {folder} share the id {k!r}; "
                             "keep one of them")
        out[k] = path
    return out


def _pair(layout: str, images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path,
          role: str | None = None) -> list[Pair]:
    """Pairs by id; images without masks (or masks without images) are an error, never skipped."""
    lonely = sorted(set(images) - set(masks), key=natural_key)
    if lonely:
        names = [images[k].name for k in lonely]
        raise BenchError(f"{layout}: {len(lonely)} image(s) in {image_dir} have no mask in {mask_dir} "
                         f"({_few(names)}); add the missing masks or remove those images")
    orphans = sorted(set(masks) - set(images), key=natural_key)
    if orphans:
        names = [masks[k].name for k in orphans]
        raise BenchError(f"{layout}: {len(orphans)} mask(s) in {mask_dir} have no image in {image_dir} "
                         f"({_few(names)}); add the missing images or remove those masks")
    return [Pair(k, images[k], masks[k], role) for k in sorted(images, key=natural_key)]


def _regex_key(pattern: str) -> Callable[[Path], str | None]:
    compiled = re.compile(pattern, re.IGNORECASE)

    def key(path: Path) -> str | None:
        match = compiled.fullmatch(path.name)
        return match.group(1) if match else None

    return key


def _stem(path: Path) -> str:
    return path.stem


def _not_layout(root: Path, layout: str) -> BenchError:
    return BenchError(f"{root} does not hold the {layout} layout: expected {LAYOUTS[layout].expects}; "
                      "check the folder, or drop the layout name to have it recognised")


def _hint(root: Path, *words: str) -> bool:
    """Whether the folder's name (letters and digits only, lower case) contains one of ``words``."""
    name = re.sub(r"[^a-z0-9]", "", root.name.lower())
    return any(word in name for word in words)


# ----------------------------------------------------------------------------------------------
# images/ + masks/ (Kvasir-SEG, the PraNet png layout, generic)

KVASIR_ID = re.compile(r"c[a-z0-9]{24}")


def _has_images_masks(root: Path) -> bool:
    return _subdir(root, "images") is not None and _subdir(root, "masks") is not None


def _scan_images_masks(root: Path, layout: str, mask_rule: str) -> Scan:
    image_dir, mask_dir = _subdir(root, "images"), _subdir(root, "masks")
    if image_dir is None or mask_dir is None:
        raise _not_layout(root, layout)
    images = _by_key(_images(image_dir), _stem, layout, image_dir)
    masks = _by_key(_images(mask_dir), _stem, layout, mask_dir)
    return Scan(layout, root, _pair(layout, images, masks, image_dir, mask_dir), mask_rule)


def _looks_like_kvasir(root: Path) -> bool:
    if not _has_images_masks(root):
        return False
    if _hint(root, "kvasir"):
        return True
    stems = [p.stem for p in _images(_subdir(root, "images"))]
    return bool(stems) and all(KVASIR_ID.fullmatch(s) for s in stems)


def scan_kvasir_seg(root: Path) -> Scan:
    """Kvasir-SEG; the official 880/120 split when the folder holds the 1000 released pairs."""
    scan = _scan_images_masks(root, "kvasir-seg", "threshold")
    ids = {pair.id for pair in scan.pairs}
    if len(ids) == KVASIR_SEG_N_PAIRS and KVASIR_SEG_TEST_IDS <= ids:
        scan.pairs = [Pair(p.id, p.image, p.mask, "test" if p.id in KVASIR_SEG_TEST_IDS else "train")
                      for p in scan.pairs]
        scan.official = True
    else:
        scan.notes.append(f"{len(ids)} pairs, not the 1000 of the Kvasir-SEG release with its official "
                          "880/120 split (Jha et al.): a seeded split is used")
    return scan


# ----------------------------------------------------------------------------------------------
# CVC-ClinicDB, CVC-ColonDB, ETIS-LaribPolypDB (original releases; PraNet png layout as fallback)

_CLINIC_GT = ("Ground Truth", "GroundTruth", "Ground_Truth")


def _is_clinicdb_original(root: Path) -> bool:
    return _subdir(root, "Original") is not None and _subdir(root, *_CLINIC_GT) is not None


def scan_cvc_clinicdb(root: Path) -> Scan:
    if not _is_clinicdb_original(root):
        return _scan_images_masks(root, "cvc-clinicdb", "threshold")
    image_dir, mask_dir = _subdir(root, "Original"), _subdir(root, *_CLINIC_GT)
    images = _by_key(_images(image_dir), _stem, "cvc-clinicdb", image_dir)
    masks = _by_key(_images(mask_dir), _stem, "cvc-clinicdb", mask_dir)
    return Scan("cvc-clinicdb", root, _pair("cvc-clinicdb", images, masks, image_dir, mask_dir), "threshold")


_COLONDB_IMAGE = _regex_key(r"(\d+)\.tiff?")
_COLONDB_MASK = _regex_key(r"p(\d+)\.tiff?")
_COLONDB_CONTOUR = _regex_key(r"cp(\d+)\.tiff?")


def _is_colondb_original(root: Path) -> bool:
    files = [p for p in root.iterdir() if p.is_file()]
    return any(_COLONDB_IMAGE(p) for p in files) and any(_COLONDB_MASK(p) for p in files)


def scan_cvc_colondb(root: Path) -> Scan:
    if not _is_colondb_original(root):
        return _scan_images_masks(root, "cvc-colondb", "threshold")
    files = _images(root)
    images = _by_key(files, _COLONDB_IMAGE, "cvc-colondb", root)
    masks = _by_key(files, _COLONDB_MASK, "cvc-colondb", root)
    scan = Scan("cvc-colondb", root, _pair("cvc-colondb", images, masks, root, root), "threshold")
    other = [p.name for p in files if not (_COLONDB_IMAGE(p) or _COLONDB_MASK(p) or _COLONDB_CONTOUR(p))]
    if other:
        scan.notes.append(f"{len(other)} other image file(s) not used: {_few(other)}")
    return scan


_ETIS_GT = ("Ground Truth", "GroundTruth", "Ground_Truth")


def _is_etis_original(root: Path) -> bool:
    return _subdir(root, "ETIS-LaribPolypDB") is not None and _subdir(root, *_ETIS_GT) is not None


def scan_etis(root: Path) -> Scan:
    if not _is_etis_original(root):
        return _scan_images_masks(root, "etis-laribpolypdb", "threshold")
    image_dir, mask_dir = _subdir(root, "ETIS-LaribPolypDB"), _subdir(root, *_ETIS_GT)
    images = _by_key(_images(image_dir), _regex_key(r"(\d+)\.tiff?"), "etis-laribpolypdb", image_dir)
    masks = _by_key(_images(mask_dir), _regex_key(r"p(\d+)\.tiff?"), "etis-laribpolypdb", mask_dir)
    pairs = _pair("etis-laribpolypdb", images, masks, image_dir, mask_dir)
    return Scan("etis-laribpolypdb", root, pairs, "threshold")


# ----------------------------------------------------------------------------------------------
# GlaS (Warwick QU release): official split train 85 / test = testA 60 + testB 20

_GLAS_IMAGE = _regex_key(r"((?:train|testA|testB)_\d+)\.bmp")
_GLAS_MASK = _regex_key(r"((?:train|testA|testB)_\d+)_anno\.bmp")


def _is_glas(root: Path) -> bool:
    return any(_GLAS_IMAGE(p) for p in root.iterdir() if p.is_file())


def scan_glas(root: Path) -> Scan:
    if not _is_glas(root):
        raise _not_layout(root, "glas")
    files = _images(root)
    images = _by_key(files, _GLAS_IMAGE, "glas", root)
    masks = _by_key(files, _GLAS_MASK, "glas", root)
    pairs = [Pair(p.id, p.image, p.mask, "train" if p.id.lower().startswith("train") else "test")
             for p in _pair("glas", images, masks, root, root)]
    return Scan("glas", root, pairs, "label", official=True)


# ----------------------------------------------------------------------------------------------
# ISIC 2016 / 2017 / 2018 (challenge folders, or one flat folder)

_ISIC_IMAGE = _regex_key(r"(ISIC_\d+)\.(?:jpg|jpeg|png)")
_ISIC_MASK = _regex_key(r"(ISIC_\d+)_segmentation\.png")
_ISIC_YEARS = {"isbi2016": "isic-2016", "isic2016": "isic-2016", "isic2017": "isic-2017", "isic2018": "isic-2018"}


def _role(name: str) -> str | None:
    lowered = name.lower()
    for word, role in (("train", "train"), ("valid", "validation"), ("test", "test")):
        if word in lowered:
            return role
    return None


def _isic_folders(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
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


def _isic_year(root: Path, folders: list[Path]) -> str:
    for folder in [root, *folders]:
        compact = re.sub(r"[^a-z0-9]", "", folder.name.lower())
        for prefix, layout in _ISIC_YEARS.items():
            if compact.startswith(prefix):
                return layout
    return "isic"


def _is_isic(root: Path) -> bool:
    data, truth = _isic_folders(root)
    if set(data) & set(truth):
        return True
    files = [p for p in root.iterdir() if p.is_file()]
    return any(_ISIC_IMAGE(p) for p in files) and any(_ISIC_MASK(p) for p in files)


def _isic_pairs(data_dir: Path, truth_dir: Path, layout: str, role: str | None) -> list[Pair]:
    images = _by_key(_images(data_dir), _ISIC_IMAGE, layout, data_dir)
    masks = _by_key(_images(truth_dir), _ISIC_MASK, layout, truth_dir)
    return _pair(layout, images, masks, data_dir, truth_dir, role)


def scan_isic(root: Path, layout: str | None = None) -> Scan:
    """Training (+ Test) challenge folders → official split; Validation serves as test if no Test."""
    data, truth = _isic_folders(root)
    layout = layout if layout not in (None, "isic") else _isic_year(root, [*data.values(), *truth.values()])
    roles = [r for r in ("train", "validation", "test") if r in data and r in truth]
    if not roles:
        files = [p for p in root.iterdir() if p.is_file()]
        if not (any(_ISIC_IMAGE(p) for p in files) and any(_ISIC_MASK(p) for p in files)):
            raise _not_layout(root, layout)
        return Scan(layout, root, _isic_pairs(root, root, layout, None), "threshold")
    scan = Scan(layout, root, [], "threshold")
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
        scan.pairs += _isic_pairs(data[role], truth[role], layout, split_role)
    ids = [p.id for p in scan.pairs]
    if len(set(ids)) != len(ids):
        raise BenchError(f"{layout}: the same ISIC id appears in two folders of {root}; remove the duplicate")
    return scan


# ----------------------------------------------------------------------------------------------
# Registry and recognition


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    expects: str          # the files and folders, as error messages quote them
    split: str            # the official split, or how the split is made
    detect: Callable[[Path], bool]
    scan: Callable[[Path], Scan]

    @property
    def description(self) -> str:
        return f"{self.title}: {self.expects}; {self.split}"


_SEEDED = "seeded 80/20 split"
_PRANET = "or the PraNet images/N.png + masks/N.png"
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in [
    Layout("glas", "GlaS (Warwick QU)", "train_N.bmp + train_N_anno.bmp, testA_N / testB_N likewise",
           "official split train 85 / test 80 (testA + testB)", _is_glas, scan_glas),
    Layout("isic-2016", "ISIC 2016 part 1", "ISBI2016_ISIC_Part1_{Training,Test}_Data + ..._GroundTruth "
           "(ISIC_x.jpg + ISIC_x_Segmentation.png)", "official split 900/379", _is_isic,
           lambda root: scan_isic(root, "isic-2016")),
    Layout("isic-2017", "ISIC 2017 part 1", "ISIC-2017_{Training,Validation,Test_v2}_Data + "
           "..._Part1_GroundTruth", "official split 2000/600 (validation unused)", _is_isic,
           lambda root: scan_isic(root, "isic-2017")),
    Layout("isic-2018", "ISIC 2018 task 1", "ISIC2018_Task1-2_{Training,Validation,Test}_Input + "
           "ISIC2018_Task1_{...}_GroundTruth", "official test folder if present, else validation as test",
           _is_isic, lambda root: scan_isic(root, "isic-2018")),
    Layout("isic", "ISIC of any year", "the challenge folders, or one folder of ISIC_x.jpg + "
           "ISIC_x_segmentation.png", f"official where the folders give one, else {_SEEDED}", _is_isic, scan_isic),
    Layout("cvc-colondb", "CVC-ColonDB", f"one folder of N.tiff (or N.tif) + pN.tiff mask (+ cpN.tiff contour), "
           f"{_PRANET}", _SEEDED, _is_colondb_original, scan_cvc_colondb),
    Layout("cvc-clinicdb", "CVC-ClinicDB", f"Original/N.tif + Ground Truth/N.tif, {_PRANET}", _SEEDED,
           _is_clinicdb_original, scan_cvc_clinicdb),
    Layout("etis-laribpolypdb", "ETIS-LaribPolypDB", f"ETIS-LaribPolypDB/N.tif + Ground Truth/pN.tif, {_PRANET}",
           _SEEDED, _is_etis_original, scan_etis),
    Layout("kvasir-seg", "Kvasir-SEG", "images/NAME.jpg + masks/NAME.jpg",
           f"official split 880/120 (Jha et al.) for the full release, else {_SEEDED}", _looks_like_kvasir,
           scan_kvasir_seg),
    Layout("generic", "generic", "images/ + masks/ paired by file stem (any common image extension)", _SEEDED,
           _has_images_masks, lambda root: _scan_images_masks(root, "generic", "auto")),
]}

# Order of automatic recognition: specific file names first, then images/ + masks/ by folder name.
_PRANET_HINTS = (("cvc-clinicdb", ("clinicdb", "cvc612")), ("cvc-colondb", ("colondb",)),
                 ("etis-laribpolypdb", ("etis",)))


def recognise(root: Path) -> str | None:
    """The layout of ``root``, or None. ISIC layouts are named by year from their folder names."""
    for name in ("glas", "isic", "cvc-colondb", "cvc-clinicdb", "etis-laribpolypdb", "kvasir-seg"):
        if LAYOUTS[name].detect(root):
            if name == "isic":
                data, truth = _isic_folders(root)
                return _isic_year(root, [*data.values(), *truth.values()])
            return name
    if _has_images_masks(root):
        for name, words in _PRANET_HINTS:
            if _hint(root, *words):
                return name
        return "generic"
    return None


def _unwrap(root: Path) -> Path | None:
    """The single sub-folder of ``root`` (a zip's wrapper folder), ignoring hidden and __MACOSX."""
    children = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    loose = [p for p in root.iterdir() if _is_image(p)]
    return children[0] if len(children) == 1 and not loose else None


def check_folder(root: Path) -> None:
    if not root.exists():
        raise BenchError(f"dataset folder {root} does not exist; check the path (bench datasets lists the layouts)")
    if not root.is_dir():
        raise BenchError(f"{root} is a file, not a dataset folder; pass the folder that holds the images")


def scan(root: Path, layout: str | None = None) -> Scan:
    """Pairs of ``root`` read as ``layout`` (recognised from the folder when None).

    A folder that holds nothing but one sub-folder (a zip's wrapper) is looked into once.
    """
    check_folder(root)
    if layout is None:
        found, inner = recognise(root), _unwrap(root)
        if found is None and inner is not None:
            found, root = recognise(inner), inner
        if found is None:
            tried = "; ".join(f"{lay.name} ({lay.expects})" for lay in LAYOUTS.values()
                              if not lay.name.startswith("isic-"))
            raise BenchError(f"folder layout of {root} not recognised; tried {tried}. Arrange the files as "
                             "one of these, or name the layout as LAYOUT:PATH")
        layout = found
    try:
        result = LAYOUTS[layout].scan(root)
    except BenchError:
        inner = _unwrap(root)
        if inner is None:
            raise
        result = LAYOUTS[layout].scan(inner)
    if not result.pairs:
        raise BenchError(f"{layout} at {result.root}: no image/mask pairs found; expected {LAYOUTS[layout].expects}")
    return result


# ----------------------------------------------------------------------------------------------
# Decoding


def _open(path: Path) -> Image.Image | np.ndarray:
    """A decoded PIL image, or a numpy array from ``tifffile`` for TIFFs that PIL cannot read."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes now: a truncated file raises here, not later
            return image
    except DECODE_ERRORS as err:
        reason = f"{type(err).__name__}: {err}"
    if path.suffix.lower() in TIFF_EXTENSIONS:
        try:
            import tifffile

            array = np.asarray(tifffile.imread(path, key=0))
            if array.ndim in (2, 3) and array.size:
                return array
            reason += f"; tifffile read an array of shape {array.shape}"
        except Exception as err:  # tifffile raises several types for bad files
            reason += f"; tifffile: {type(err).__name__}: {err}"
    raise BenchError(f"cannot decode {path} ({reason}); the file is corrupt or truncated: replace it with "
                     "the released file or remove the pair")


def _full_scale(array: np.ndarray) -> float:
    """The value of "white": 255 for 8-bit data, 65535 for 16-bit data, 1 for [0, 1] floats."""
    if array.dtype == bool:
        return 1.0
    peak = float(array.max()) if array.size else 0.0
    if np.issubdtype(array.dtype, np.integer):
        return 255.0 if array.dtype == np.uint8 or peak <= 255 else 65535.0
    return 1.0 if peak <= 1.0 else 255.0


def _as_channels_last(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        return np.moveaxis(array, 0, -1)
    return array


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    image = _open(path)
    if isinstance(image, Image.Image) and image.mode in ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1",
                                                           "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    array = _as_channels_last(np.asarray(image))
    array = np.clip(array.astype(np.float64) / _full_scale(array) * 255, 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array[..., :3] if array.shape[-1] >= 3 else np.repeat(array[..., :1], 3, axis=-1)


def read_mask(path: Path, rule: str) -> np.ndarray:
    """(H, W) bool: the mask binarised with ``rule`` ("threshold", "label" or "auto")."""
    image = _open(path)
    if isinstance(image, Image.Image) and image.mode in ("P", "PA") and rule != "label":
        image = image.convert("L")  # palette indices are not intensities
    array = _as_channels_last(np.asarray(image))
    if array.ndim == 3:
        channels = array[..., :3] if array.shape[-1] >= 3 else array[..., :1]
        array = channels.mean(axis=-1) if np.issubdtype(array.dtype, np.number) else channels[..., 0]
        scale = _full_scale(channels)
    else:
        scale = _full_scale(array)
    if rule == "label" or (rule == "auto" and array.size and float(array.max()) <= 1):
        return array > 0
    threshold = (scale + 1) / 2 if scale > 1 else 0.5  # 128 for 8-bit masks (DESIGN.md §4)
    return array >= threshold


def _image_size(image: np.ndarray) -> tuple[int, int]:
    return int(image.shape[1]), int(image.shape[0])  # (W, H), as PIL prints sizes


def decode_pair(pair: Pair, size: int | None, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Image (3, S, S) uint8 and mask (S, S) uint8 in {0, 1}; full resolution when ``size`` is None."""
    image = read_image(pair.image)
    mask = read_mask(pair.mask, rule)
    if mask.shape != image.shape[:2]:
        w, h = _image_size(image)
        mw, mh = mask.shape[1], mask.shape[0]
        raise BenchError(f"mask {pair.mask} is {mw}×{mh} but its image {pair.image} is {w}×{h}; "
                         "replace the mask with the one released for this image")
    if size is not None:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        area = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BOX)
        mask = np.asarray(area) >= 0.5
    return np.ascontiguousarray(image.transpose(2, 0, 1)), mask.astype(np.uint8)


def read_pool_image(path: Path, size: int) -> np.ndarray:
    """(3, S, S) uint8: one unlabelled image, resized like the labelled images."""
    image = Image.fromarray(read_image(path)).resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def pool_files(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursively), in natural order of the relative path."""
    check_folder(root)
    files = [p for p in root.rglob("*") if _is_image(p) and not any(part.startswith((".", "__MACOSX"))
                                                                   for part in p.relative_to(root).parts)]
    if not files:
        raise BenchError(f"pool folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                         "pass a folder of unlabelled images")
    return sorted(files, key=lambda p: natural_key(p.relative_to(root).as_posix()))
