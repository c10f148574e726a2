"""What every layout shares: pairs, scans, the layout record and the folder/pairing helpers."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.datasets.splits import natural_key
from bench.errors import BenchError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")
IMAGE_DIRS = ("images", "image", "imgs", "img")
MASK_DIRS = ("masks", "mask", "labelcol", "gt", "groundtruth", "ground_truth", "ground truth")
# <id>_segmentation.png, <id>_mask.png, <id>_anno.bmp, ...; <id>_mask_1.png is a further mask of <id>
MASK_SUFFIX = re.compile(r"(.+?)[_-](?:segmentation|mask|anno|gt|label)(?:[_-](\d+))?", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One image and its mask; ``role`` is "train" or "test" where the layout defines the split;
    ``extra``: further mask files of the same image (one per class, or numbered), united with ``mask``."""

    id: str
    image: Path
    mask: Path
    role: str | None = None
    extra: tuple[Path, ...] = ()


@dataclass
class Scan:
    """The pairs found in a folder, before decoding (cheap: listing only)."""

    layout: str
    root: Path
    pairs: list[Pair]
    mask_rule: str                       # a rule of bench.datasets.decode ("auto", "label", ...)
    official: bool = False               # pairs carry the official train/test roles
    notes: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)   # part name → pairs (layouts made of parts)

    @property
    def files(self) -> list[Path]:
        return [path for pair in self.pairs for path in (pair.image, pair.mask, *pair.extra)]


@dataclass(frozen=True)
class Layout:
    """A registered layout: one per dataset format; ``priority`` orders automatic recognition."""

    name: str
    title: str
    expects: str          # the files and folders, as error messages quote them
    split: str            # the official split, or how the split is made
    detect: Callable[[Path], bool]
    scan: Callable[[Path], Scan]
    priority: int = 50
    hints: tuple[str, ...] = ()     # folder-name words that select it for a plain images/ + masks/ folder
    parts: Callable[[Path], dict[str, Path]] | None = None   # named sub-datasets (``LAYOUT:PATH#PART``)
    name_for: Callable[[Path], str] | None = None            # the layout's name for this folder (ISIC years)

    @property
    def description(self) -> str:
        return f"{self.title}: {self.expects}; {self.split}"


SEEDED = "seeded 80/20 split"

# ----------------------------------------------------------------------------------------------
# Folder helpers


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if is_image(p)), key=lambda p: natural_key(p.name))


def child_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))),
                  key=lambda p: natural_key(p.name))


def subdir(root: Path, *names: str) -> Path | None:
    """The first child folder of ``root`` whose name matches one of ``names`` (case-insensitive)."""
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for name in names:
        if name.lower() in children:
            return children[name.lower()]
    return None


def few(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", ... ({len(names) - k} more)" if len(names) > k else "")


def hint(root: Path, *words: str) -> bool:
    """Whether the folder's name (letters and digits only, lower case) contains one of ``words``."""
    name = re.sub(r"[^a-z0-9]", "", root.name.lower())
    return any(word in name for word in words)


def not_layout(root: Path, layout: str, expects: str) -> BenchError:
    return BenchError(f"{root} does not hold the {layout} layout: expected {expects}; "
                      "check the folder, or drop the layout name to have it recognised")


def by_key(files: list[Path], key: Callable[[Path], str | None], layout: str, folder: Path) -> dict[str, Path]:
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


def regex_key(pattern: str) -> Callable[[Path], str | None]:
    compiled = re.compile(pattern, re.IGNORECASE)

    def key(path: Path) -> str | None:
        match = compiled.fullmatch(path.name)
        return match.group(1) if match else None

    return key


def stem(path: Path) -> str:
    return path.stem


def pair(layout: str, images_: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path,
         role: str | None = None, extra: dict[str, tuple[Path, ...]] | None = None) -> list[Pair]:
    """Pairs by id; images without masks (or masks without images) are an error, never skipped."""
    lonely = sorted(set(images_) - set(masks), key=natural_key)
    if lonely:
        names = [images_[k].name for k in lonely]
        raise BenchError(f"{layout}: {len(lonely)} image(s) in {image_dir} have no mask in {mask_dir} "
                         f"({few(names)}); add the missing masks or remove those images")
    orphans = sorted(set(masks) - set(images_), key=natural_key)
    if orphans:
        names = [masks[k].name for k in orphans]
        raise BenchError(f"{layout}: {len(orphans)} mask(s) in {mask_dir} have no image in {image_dir} "
                         f"({few(names)}); add the missing images or remove those masks")
    extra = extra or {}
    return [Pair(k, images_[k], masks[k], role, extra.get(k, ())) for k in sorted(images_, key=natural_key)]


# ----------------------------------------------------------------------------------------------
# images/ + masks/ folders (and their variants), paired by file stem


def pair_dirs(root: Path) -> tuple[Path, Path] | None:
    """(image folder, mask folder) among the children of ``root``: images/image/img + masks/mask/labelcol/gt."""
    image_dir, mask_dir = subdir(root, *IMAGE_DIRS), subdir(root, *MASK_DIRS)
    return (image_dir, mask_dir) if image_dir is not None and mask_dir is not None else None


def _mask_folders(mask_dir: Path) -> tuple[list[Path], str | None]:
    """``masks/`` itself, or its per-class folders ``masks/0/``, ``masks/1/`` ... (united: any class)."""
    if images(mask_dir):
        return [mask_dir], None
    classes = [p for p in child_dirs(mask_dir) if p.name.isdigit() and images(p)]
    if not classes:
        return [mask_dir], None
    if len(classes) == 1:
        return classes, None
    names = ", ".join(p.name for p in classes)
    return classes, f"{mask_dir.name}/ holds one folder per class ({names}): foreground = any class"


def _mask_key(path: Path, ids: set[str]) -> tuple[str, bool]:
    """(image id, is a numbered extra mask) of a mask file: its stem, or the stem less a mask suffix."""
    if path.stem in ids:
        return path.stem, False
    match = MASK_SUFFIX.fullmatch(path.stem)
    if match and match.group(1) in ids:
        return match.group(1), match.group(2) is not None
    return path.stem, False


def pair_files(layout: str, image_files: list[Path], mask_files: list[Path], image_dir: Path, mask_dir: Path,
               role: str | None = None) -> list[Pair]:
    """Pairs of images and masks by stem; ``<id>_mask``/``_segmentation``/``_anno`` names are matched too.

    Numbered masks (``<id>_mask_1.png``) and per-class folders add further masks of the same image.
    """
    found = by_key(image_files, stem, layout, image_dir)
    primary: dict[str, Path] = {}
    extra: dict[str, list[Path]] = {}
    for path in mask_files:
        key, numbered = _mask_key(path, set(found))
        if numbered or key in primary and path.parent != primary[key].parent:
            extra.setdefault(key, []).append(path)
        elif key in primary:
            raise BenchError(f"{layout}: {primary[key].name} and {path.name} in {mask_dir} are both masks of "
                             f"{key!r}; keep one of them")
        else:
            primary[key] = path
    for key in [k for k in extra if k not in primary]:   # only numbered masks: the first is the primary
        primary[key], *rest = extra.pop(key)
        if rest:
            extra[key] = rest
    return pair(layout, found, primary, image_dir, mask_dir, role, {k: tuple(v) for k, v in extra.items()})


def scan_pair_dirs(root: Path, layout: str, role: str | None = None) -> tuple[list[Pair], list[str]]:
    """Pairs of ``root``'s image and mask folders, and notes."""
    dirs = pair_dirs(root)
    if dirs is None:
        return [], []
    image_dir, mask_dir = dirs
    folders, note = _mask_folders(mask_dir)
    mask_files = [p for folder in folders for p in images(folder)]
    return pair_files(layout, images(image_dir), mask_files, image_dir, mask_dir, role), [note] if note else []


def _role_of(name: str) -> str | None:
    lowered = re.sub(r"[^a-z]", "", name.lower())
    for word, role in (("train", "train"), ("test", "test"), ("val", "validation")):
        if lowered.startswith(word):
            return role
    return None


def split_folders(root: Path) -> dict[str, Path]:
    """Children like ``train/``, ``Train_Folder/``, ``test/``, ``val/`` that each hold image and mask folders."""
    found: dict[str, Path] = {}
    for child in child_dirs(root):
        role = _role_of(child.name)
        if role is not None and pair_dirs(child) is not None:
            if role in found:
                raise BenchError(f"{root}: two {role} folders ({found[role].name}, {child.name}); keep one")
            found[role] = child
    return found


def flat_pairs(root: Path, layout: str) -> list[Pair]:
    """One folder holding ``<id>.png`` beside ``<id>_mask.png`` (or ``_segmentation``, ``_anno``)."""
    files = images(root)
    stems = {p.stem for p in files}
    is_mask = {p: bool((m := MASK_SUFFIX.fullmatch(p.stem)) and m.group(1) in stems) for p in files}
    masks = [p for p in files if is_mask[p]]
    if not masks:
        return []
    return pair_files(layout, [p for p in files if not is_mask[p]], masks, root, root)


def has_flat_pairs(root: Path) -> bool:
    files = images(root)
    stems = {p.stem for p in files}
    n_masks = sum(bool((m := MASK_SUFFIX.fullmatch(p.stem)) and m.group(1) in stems) for p in files)
    return n_masks > 0 and 2 * n_masks >= len(files)


def has_image_masks(root: Path) -> bool:
    """Image and mask folders here, or in split folders (train/, test/), or ``_mask`` files side by side."""
    return pair_dirs(root) is not None or bool(split_folders(root)) or has_flat_pairs(root)


def scan_image_masks(root: Path, layout: str, rule: str, expects: str) -> Scan:
    """Any image/mask folder form: direct folders, split folders (official roles) or a flat folder."""
    if pair_dirs(root) is not None:
        pairs, notes = scan_pair_dirs(root, layout)
        return Scan(layout, root, pairs, rule, notes=notes)
    folders = split_folders(root)
    if folders:
        return _scan_split_folders(root, layout, rule, folders)
    if has_flat_pairs(root):
        return Scan(layout, root, flat_pairs(root, layout), rule)
    raise not_layout(root, layout, expects)


def _scan_split_folders(root: Path, layout: str, rule: str, folders: dict[str, Path]) -> Scan:
    test_role = "test" if "test" in folders else "validation" if "validation" in folders else None
    scan = Scan(layout, root, [], rule)
    official = "train" in folders and test_role is not None
    per_folder: list[tuple[Path, list[Pair]]] = []
    for role, folder in folders.items():
        if official and role not in ("train", test_role):
            scan.notes.append(f"{folder.name}/ (validation) not used: the protocol has no validation step")
            continue
        split_role = ("train" if role == "train" else "test") if official else None
        pairs, notes = scan_pair_dirs(folder, layout, split_role)
        per_folder.append((folder, pairs))
        scan.notes += notes
    ids = [p.id for _, pairs in per_folder for p in pairs]
    clash = len(set(ids)) != len(ids)   # the same file name in two folders: ids become folder/name
    for folder, pairs in per_folder:
        scan.pairs += [Pair(f"{folder.name}/{p.id}", p.image, p.mask, p.role, p.extra) if clash else p
                       for p in pairs]
    scan.official = official
    if official and test_role == "validation":
        scan.notes.append(f"no test folder: {folders['validation'].name}/ serves as the test split")
    if not official:
        scan.notes.append(f"folders {', '.join(f.name for f in folders.values())} are not a train/test pair: "
                          "their images are split by seed")
    return scan
