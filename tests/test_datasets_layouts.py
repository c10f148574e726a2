"""Native layout readers: the real excerpts, small layouts with the publishers' exact file names, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.datasets import decode, inspect, layouts, load_dataset
from bench.datasets.kvasir_split import KVASIR_SEG_TEST_IDS
from bench.errors import BenchError

# A 32×32 image whose mask is the box x 8..24, y 8..16 (JPEG-block aligned, so a JPEG mask keeps it
# exact after thresholding). Resized to 16×16 by area + threshold it is x 4..12, y 4..8: 32/256 pixels.
SIDE = 32
BOX = (8, 8, 24, 16)
FG_16 = 8 * 4 / 256


def box_mask(value: int = 255, side: int = SIDE) -> np.ndarray:
    mask = np.zeros((side, side), np.uint8)
    x0, y0, x1, y1 = BOX
    mask[y0:y1, x0:x1] = value
    return mask


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (SIDE, SIDE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(rgb).save(path)


def write_mask(path: Path, mask: np.ndarray, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.repeat(mask[..., None], 3, axis=-1) if rgb else mask
    Image.fromarray(array).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(array).save(path)


def make_kvasir(root: Path, ids: list[str]) -> Path:
    for i, name in enumerate(ids):
        write_image(root / "images" / f"{name}.jpg", seed=i)
        write_mask(root / "masks" / f"{name}.jpg", box_mask(), rgb=True)   # 3-channel JPEG, as released
    return root


def make_clinicdb(root: Path, n: int) -> Path:
    for i in range(1, n + 1):
        write_image(root / "Original" / f"{i}.tif", seed=i)
        write_mask(root / "Ground Truth" / f"{i}.tif", box_mask())
    return root


def make_colondb(root: Path, frames: list[int], tif_frames: tuple[int, ...] = ()) -> Path:
    contour = np.zeros((SIDE, SIDE), np.uint8)
    contour[0, :] = 255   # a contour unlike the mask: reading it instead of pN would show
    for frame in frames:
        suffix = ".tif" if frame in tif_frames else ".tiff"
        write_image(root / f"{frame}{suffix}", seed=frame)
        write_mask(root / f"p{frame}.tiff", box_mask())
        write_mask(root / f"cp{frame}.tiff", contour)
    return root


def make_etis(root: Path, n: int) -> Path:
    for i in range(1, n + 1):
        write_image(root / "ETIS-LaribPolypDB" / f"{i}.tif", seed=i)
        write_mask(root / "Ground Truth" / f"p{i}.tif", box_mask())
    return root


def make_glas(root: Path, train: int = 3, test_a: int = 2, test_b: int = 1) -> Path:
    instances = np.zeros((SIDE, SIDE), np.uint8)
    instances[8:16, 8:16] = 1    # two gland instances, labels 1 and 2: together the box
    instances[8:16, 16:24] = 2
    for prefix, count in (("train", train), ("testA", test_a), ("testB", test_b)):
        for i in range(1, count + 1):
            write_image(root / f"{prefix}_{i}.bmp", seed=i)
            write_mask(root / f"{prefix}_{i}_anno.bmp", instances)
    (root / "Grade.csv").write_text("name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)\n")
    return root


def make_isic(root: Path, folders: dict[tuple[str, str], list[int]], suffix: str = "_Segmentation") -> Path:
    for (data, truth), ids in folders.items():
        for i in ids:
            write_image(root / data / f"ISIC_{i:07d}.jpg", seed=i)
            write_mask(root / truth / f"ISIC_{i:07d}{suffix}.png", box_mask())
            if "2017" in data:
                write_mask(root / data / f"ISIC_{i:07d}_superpixels.png", box_mask(7))
    return root


# ----------------------------------------------------------------------------------------------
# The real excerpts (the shared_data fixture)


def test_kvasir_excerpt(shared_data: Path, tmp_path: Path):
    root = shared_data / "Kvasir-SEG"
    assert layouts.recognise(root) == "kvasir-seg"
    data = load_dataset(str(root), 64, cache_dir=tmp_path)
    stems = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    assert data.name == "kvasir-seg" and sorted(data.ids) == stems and len(data.ids) == 5
    assert data.images.shape == (5, 3, 64, 64) and data.images.dtype == np.uint8
    assert data.masks.shape == (5, 64, 64) and set(np.unique(data.masks)) == {0, 1}
    assert all(m.sum() > 0 for m in data.masks)
    # 5 pairs are not the released 1000: seeded 80/20 (4/1), and the note says why
    assert (len(data.train), len(data.test), data.split) == (4, 1, "seeded 80/20 (seed 0)")
    assert any("880/120" in note for note in data.notes)
    # binarisation at 128 of the JPEG mask, whose compression noise (values 1..127) covers ~0.4% of
    # the pixels: exactly the pixels ≥ 128, not the noise; the resized share stays close to it
    path = root / "masks" / "cju0qkwl35piu0993l0dewei2.jpg"
    channel = np.asarray(Image.open(path))[..., 0]
    binary = decode.read_mask(path, "threshold")
    assert binary.sum() == (channel >= 128).sum() and binary.sum() < (channel > 0).sum()
    i = data.ids.index("cju0qkwl35piu0993l0dewei2")
    assert abs(data.masks[i].mean() - binary.mean()) < 0.01


def test_mask_binarisation_rules(tmp_path: Path):
    values = np.array([[0, 3, 8, 127, 128, 200, 255]], np.uint8)
    Image.fromarray(np.repeat(values[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")   # 3-channel
    Image.fromarray(values).save(tmp_path / "grey.png")
    Image.fromarray(np.array([[0, 1, 1, 0, 2, 7, 0]], np.uint8)).save(tmp_path / "labels.bmp")
    expected = [[False, False, False, False, True, True, True]]
    assert decode.read_mask(tmp_path / "rgb.png", "threshold").tolist() == expected
    assert decode.read_mask(tmp_path / "grey.png", "auto").tolist() == expected      # max > 1: threshold
    assert decode.read_mask(tmp_path / "labels.bmp", "label").tolist() == [[0, 1, 1, 0, 1, 1, 0]]
    Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8)).save(tmp_path / "01.png")
    assert decode.read_mask(tmp_path / "01.png", "auto").tolist() == [[False, True, True, False]]
    sixteen = np.array([[0, 100, 40000, 65535]], np.uint16)                            # 16-bit mask
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    assert decode.read_mask(tmp_path / "16.png", "threshold").tolist() == [[False, False, True, True]]


def test_colondb_excerpt(shared_data: Path, tmp_path: Path):
    root = shared_data / "CVC-ColonDB"
    assert layouts.recognise(root) == "cvc-colondb"
    scan = layouts.scan(root)
    assert [p.id for p in scan.pairs] == ["1", "39", "61", "77", "98", "156", "209", "301"]
    frame77 = scan.pairs[3]
    assert frame77.image.name == "77.tif" and frame77.mask.name == "p77.tiff"   # not the cp77 contour
    data = load_dataset(f"cvc-colondb:{root}", 64, cache_dir=tmp_path)
    assert data.name == "cvc-colondb" and len(data.ids) == 8 and (len(data.train), len(data.test)) == (6, 2)
    assert set(np.unique(data.masks)) == {0, 1} and all(m.sum() > 0 for m in data.masks)
    report = inspect(str(root))
    assert (report.name, report.n_pairs, report.image_sizes) == ("cvc-colondb", 8, {(574, 500): 8})
    assert report.empty_masks == 0 and 0 < report.foreground < 0.5


# ----------------------------------------------------------------------------------------------
# Every reader on small layouts with the publishers' file names


def _check_box_masks(data) -> None:
    assert set(np.unique(data.masks)) == {0, 1}
    for mask in data.masks:
        assert mask.mean() == pytest.approx(FG_16)
        assert mask[4:8, 4:12].all()


def test_kvasir_official_split(tmp_path: Path):
    others = [f"c{i:024d}" for i in range(880)]   # Kvasir-like ids; the 120 official test ids
    root = make_kvasir(tmp_path / "Kvasir-SEG", sorted(KVASIR_SEG_TEST_IDS) + others)
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.split, len(data.train), len(data.test)) == ("official", 880, 120)
    assert {data.ids[i] for i in data.test} == KVASIR_SEG_TEST_IDS
    _check_box_masks(data)


def test_kvasir_small_is_seeded(tmp_path: Path):
    root = make_kvasir(tmp_path / "kvasir", [f"c{i:024d}" for i in range(5)])
    assert layouts.recognise(root) == "kvasir-seg"   # recognised by its ids, whatever the folder name
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.split, len(data.train), len(data.test)) == ("seeded 80/20 (seed 0)", 4, 1)
    _check_box_masks(data)


@pytest.mark.parametrize("form", ["original", "pranet"])
def test_clinicdb(tmp_path: Path, form: str):
    root = tmp_path / "CVC-ClinicDB"
    if form == "original":
        make_clinicdb(root, 5)
    else:
        for i in range(1, 6):
            write_image(root / "images" / f"{i}.png", seed=i)
            write_mask(root / "masks" / f"{i}.png", box_mask())
    assert layouts.recognise(root) == "cvc-clinicdb"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.name == "cvc-clinicdb" and data.ids == ["1", "2", "3", "4", "5"]
    assert (len(data.train), len(data.test)) == (4, 1)
    _check_box_masks(data)


def test_colondb_tif_frame_and_contours(tmp_path: Path):
    root = make_colondb(tmp_path / "colondb", [1, 2, 10, 77], tif_frames=(77,))
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.name == "cvc-colondb" and data.ids == ["1", "2", "10", "77"]
    _check_box_masks(data)   # the pN masks, not the cpN contours (their top row)


def test_etis(tmp_path: Path):
    root = make_etis(tmp_path / "ETIS-LaribPolypDB", 3)
    assert layouts.recognise(root) == "etis-laribpolypdb"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.name == "etis-laribpolypdb" and data.ids == ["1", "2", "3"]
    _check_box_masks(data)


def test_glas_official_split_and_instances(tmp_path: Path):
    root = make_glas(tmp_path / "Warwick QU Dataset (Released 2016_07_08)")
    assert layouts.recognise(root) == "glas"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.split, len(data.train), len(data.test)) == ("official", 3, 3)
    assert sorted(data.ids[i] for i in data.test) == ["testA_1", "testA_2", "testB_1"]
    _check_box_masks(data)   # instance labels 1 and 2 (< 128) → foreground


def test_isic_2016_official(tmp_path: Path):
    root = make_isic(tmp_path / "isic", {("ISBI2016_ISIC_Part1_Training_Data",
                                          "ISBI2016_ISIC_Part1_Training_GroundTruth"): [0, 1, 2, 4],
                                         ("ISBI2016_ISIC_Part1_Test_Data",
                                          "ISBI2016_ISIC_Part1_Test_GroundTruth"): [3, 5]})
    assert layouts.recognise(root) == "isic-2016"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.name, data.split, len(data.train), len(data.test)) == ("isic-2016", "official", 4, 2)
    assert sorted(data.ids[i] for i in data.test) == ["ISIC_0000003", "ISIC_0000005"]
    _check_box_masks(data)


def test_isic_2017_ignores_superpixels_and_validation(tmp_path: Path):
    root = make_isic(tmp_path / "ISIC2017", {
        ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"): [0, 1, 2],
        ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"): [10],
        ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"): [20, 21]}, suffix="_segmentation")
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.name, data.split, len(data.train), len(data.test)) == ("isic-2017", "official", 3, 2)
    assert "ISIC_0000010" not in data.ids and any("validation" in note for note in data.notes)
    _check_box_masks(data)


def test_isic_2018_validation_as_test(tmp_path: Path):
    root = make_isic(tmp_path / "ISIC2018", {
        ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"): [0, 1, 2],
        ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"): [10, 11]},
        suffix="_segmentation")
    write_image(root / "ISIC2018_Task1-2_Test_Input" / "ISIC_0000030.jpg")   # released without masks
    write_mask(root / "ISIC2018_Task2_Training_GroundTruth_v3" / "ISIC_0000000_attribute_globules.png", box_mask())
    data = load_dataset(f"isic-2018:{root}", 16, cache_dir=tmp_path / "cache")
    assert (data.split, len(data.train), len(data.test)) == ("official", 3, 2)
    assert any("Test_Input has no ground-truth" in note for note in data.notes)


def test_generic_label_masks_and_wrapper_folder(tmp_path: Path):
    root = tmp_path / "download" / "my-set"          # a zip's wrapper folder around the data
    for name in ("a", "b", "c"):
        write_image(root / "images" / f"{name}.jpg")
        write_mask(root / "masks" / f"{name}.png", box_mask(value=1))   # {0, 1} labels
    data = load_dataset(str(tmp_path / "download"), 16, cache_dir=tmp_path / "cache")
    assert data.name == "generic" and data.ids == ["a", "b", "c"]
    _check_box_masks(data)


# ----------------------------------------------------------------------------------------------
# Bad input → one-line BenchError that names the problem


def _raises(words: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(BenchError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_unknown_names(tmp_path: Path):
    _raises(["unknown dataset 'synthetic-polpy'", "did you mean 'synthetic-polyp'"], load_dataset,
            "synthetic-polpy", 32, cache_dir=tmp_path)
    _raises(["unknown dataset layout 'kvasr-seg'", "did you mean 'kvasir-seg'"], load_dataset,
            f"kvasr-seg:{tmp_path}", 32, cache_dir=tmp_path)


def test_missing_folder(tmp_path: Path):
    _raises(["does not exist", "nowhere"], load_dataset, f"kvasir-seg:{tmp_path / 'nowhere'}", 32, cache_dir=tmp_path)
    _raises(["does not exist"], load_dataset, str(tmp_path / "nowhere"), 32, cache_dir=tmp_path)


def test_layout_not_recognised(tmp_path: Path):
    root = tmp_path / "odd"
    write_image(root / "photos" / "x.jpg")
    write_image(root / "labels" / "x.png")
    message = _raises(["not recognised", "kvasir-seg", "cvc-colondb", "glas", "generic", "LAYOUT:PATH"],
                      load_dataset, str(root), 32, cache_dir=tmp_path / "cache")
    assert "Ground Truth/pN.tif" in message   # says what each layout expects
    _raises(["does not hold the glas layout", "train_N_anno.bmp"], load_dataset, f"glas:{root}", 32,
            cache_dir=tmp_path / "cache")


def test_images_without_masks(tmp_path: Path):
    root = tmp_path / "set"
    for name in ("a", "b", "c"):
        write_image(root / "images" / f"{name}.jpg")
    write_mask(root / "masks" / "a.png", box_mask())
    _raises(["2 image(s)", "have no mask", "b.jpg", "c.jpg"], load_dataset, str(root), 32, cache_dir=tmp_path)
    make_colondb(tmp_path / "colon", [1, 2])
    (tmp_path / "colon" / "p2.tiff").unlink()
    _raises(["1 image(s)", "2.tiff"], layouts.scan, tmp_path / "colon")


def test_mask_size_differs(tmp_path: Path):
    root = make_clinicdb(tmp_path / "CVC-ClinicDB", 2)
    write_mask(root / "Ground Truth" / "2.tif", box_mask(side=40))
    _raises(["mask", "2.tif", "40×40", f"{SIDE}×{SIDE}", "Original"], load_dataset, str(root), 16,
            cache_dir=tmp_path / "cache")


def test_corrupt_image(tmp_path: Path, shared_data: Path):
    root = tmp_path / "Kvasir-SEG"
    shutil.copytree(shared_data / "Kvasir-SEG", root)
    victim = root / "images" / "cju0qx73cjw570799j4n5cjze.jpg"
    victim.write_bytes(victim.read_bytes()[:4000])   # truncated JPEG
    _raises(["cannot decode", "cju0qx73cjw570799j4n5cjze.jpg", "corrupt"], load_dataset, str(root), 32,
            cache_dir=tmp_path / "cache")
    _raises(["cju0qx73cjw570799j4n5cjze.jpg"], inspect, str(root))
    assert not list((tmp_path / "cache").glob("*"))   # nothing half-written left in the cache


@pytest.mark.filterwarnings("ignore::UserWarning")   # PIL warns about the truncated EXIF block first
def test_corrupt_tiff(tmp_path: Path, shared_data: Path):
    root = tmp_path / "CVC-ColonDB"
    shutil.copytree(shared_data / "CVC-ColonDB", root)
    victim = root / "p61.tiff"
    victim.write_bytes(victim.read_bytes()[:3000])   # neither PIL nor tifffile can read it
    _raises(["cannot decode", "p61.tiff"], inspect, str(root))


def test_no_pairs(tmp_path: Path):
    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    _raises(["no image/mask pairs"], load_dataset, str(root), 32, cache_dir=tmp_path / "cache")


def test_bad_size_and_n(tmp_path: Path):
    _raises(["image size 8"], load_dataset, "synthetic-polyp", 8, cache_dir=tmp_path)
    _raises(["n = 1", "n ≥ 2"], load_dataset, "synthetic-polyp", 32, cache_dir=tmp_path, n=1)
    _raises(["bad option"], load_dataset, "synthetic-polyp:sed=1", 32, cache_dir=tmp_path)


def test_inspect_reports_progress(tmp_path: Path):
    root = make_glas(tmp_path / "glas", train=2, test_a=1, test_b=1)
    calls: list[tuple[int, int]] = []
    report = inspect(str(root), progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (4, 4) and len(calls) == 4
    assert (report.name, report.n_pairs, report.split, report.n_train, report.n_test) == ("glas", 4, "official", 2, 2)
    assert report.foreground == pytest.approx(128 / SIDE**2)   # the 16×8 box at full resolution
    assert any(line.startswith("split") for line in report.lines())


def test_tifffile_fallback(tmp_path: Path):
    """A float32 RGB TIFF, which PIL cannot identify, is read with tifffile (values in [0, 1] → ×255)."""
    import tifffile

    values = np.zeros((SIDE, SIDE, 3), np.float32)
    values[..., 0], values[..., 1], values[..., 2] = 0.0, 0.5, 1.0
    root = make_clinicdb(tmp_path / "CVC-ClinicDB", 2)
    tifffile.imwrite(root / "Original" / "2.tif", values, photometric="rgb")
    with pytest.raises(decode.DECODE_ERRORS):   # the premise: PIL alone cannot read it
        Image.open(root / "Original" / "2.tif").load()
    assert decode.read_image(root / "Original" / "2.tif")[0, 0].tolist() == [0, 128, 255]
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.images[1, :, 5, 5].tolist() == [0, 128, 255]
    _check_box_masks(data)
