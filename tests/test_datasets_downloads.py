"""The layouts real downloads use (mirrors, renamed folders, nesting) and what the error says when unclear."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import load_dataset
from bench.datasets.layouts import LAYOUTS, recognise, scan
from bench.errors import BenchError
from tests.test_datasets_layouts import (
    SIDE,
    _check_box_masks,
    box_mask,
    make_clinicdb,
    make_kvasir,
    write_image,
    write_mask,
)


def _raises(fn, *args, **kwargs) -> str:
    with pytest.raises(BenchError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_every_layout_module_registers():
    assert list(LAYOUTS)[0] == "pranet" and list(LAYOUTS)[-1] == "generic"
    assert {"glas", "isic", "cvc-colondb", "cvc-clinicdb", "etis-laribpolypdb", "kvasir-seg"} <= set(LAYOUTS)
    priorities = [layout.priority for layout in LAYOUTS.values()]
    assert priorities == sorted(priorities)


def test_singular_folder_names(tmp_path: Path):
    root = tmp_path / "TrainDataset"   # PraNet's training folder: image/ + mask/, Kvasir ids and ClinicDB frames
    for i, name in enumerate(["1", "2", f"c{0:024d}"]):
        write_image(root / "image" / f"{name}.png", seed=i)
        write_mask(root / "mask" / f"{name}.png", box_mask())
    assert recognise(root) == "generic"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.ids == ["1", "2", f"c{0:024d}"]
    _check_box_masks(data)


def test_glas_mirror_img_labelcol(tmp_path: Path):
    root = tmp_path / "MedT-data"
    for folder, names in (("train", ["train_1", "train_2", "train_10"]), ("test", ["testA_1", "testB_3"])):
        for i, name in enumerate(names):
            write_image(root / folder / "img" / f"{name}.png", seed=i)
            write_mask(root / folder / "labelcol" / f"{name}.png", box_mask())   # binary 0/255 copies
    assert recognise(root) == "glas"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.name, data.split) == ("glas", "official")
    assert sorted(data.ids[i] for i in data.test) == ["testA_1", "testB_3"] and len(data.train) == 3
    _check_box_masks(data)


def test_glas_mirror_with_numbered_files(tmp_path: Path):
    root = tmp_path / "GlaS"           # UCTransNet-style folders; the same file names in each
    for folder in ("Train_Folder", "Val_Folder", "Test_Folder"):
        for i in range(1, 3):
            write_image(root / folder / "img" / f"{i:04d}.png", seed=i)
            write_mask(root / folder / "labelcol" / f"{i:04d}.png", box_mask(1))
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert (data.name, data.split, len(data.train), len(data.test)) == ("glas", "official", 2, 2)
    assert data.ids[data.test[0]] == "Test_Folder/0001" and any("Val_Folder" in n for n in data.notes)
    _check_box_masks(data)


@pytest.mark.parametrize("suffix", ["_segmentation", "_mask", "_Segmentation"])
def test_suffixed_mask_names(tmp_path: Path, suffix: str):
    root = tmp_path / "lesions"
    for i, name in enumerate(["ISIC_0000001", "ISIC_0000002", "b(1)"]):
        write_image(root / "images" / f"{name}.jpg", seed=i)
        write_mask(root / "masks" / f"{name}{suffix}.png", box_mask())
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.ids == ["ISIC_0000001", "ISIC_0000002", "b(1)"]
    _check_box_masks(data)


def test_masks_beside_images_and_numbered_extras(tmp_path: Path):
    root = tmp_path / "Dataset_BUSI" / "benign"   # benign (1).png + benign (1)_mask.png (+ _mask_1.png)
    left, right = box_mask(), box_mask()
    left[:, 16:], right[:, :16] = 0, 0
    for i in (1, 2):
        write_image(root / f"benign ({i}).png", seed=i)
        write_mask(root / f"benign ({i})_mask.png", left if i == 1 else box_mask())
    write_mask(root / "benign (1)_mask_1.png", right)   # a second lesion of image 1
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.ids == ["benign (1)", "benign (2)"]
    _check_box_masks(data)   # image 1: the union of its two masks is the box


def test_per_class_mask_folders(tmp_path: Path):
    root = tmp_path / "unetpp" / "inputs" / "polyps"
    for i in range(3):
        write_image(root / "images" / f"{i}.png", seed=i)
        write_mask(root / "masks" / "0" / f"{i}.png", box_mask())
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    _check_box_masks(data)
    top, bottom = box_mask(), box_mask()
    top[12:], bottom[:12] = 0, 0
    for i in range(3):
        write_mask(root / "masks" / "0" / f"{i}.png", top)
        write_mask(root / "masks" / "1" / f"{i}.png", bottom)
    united = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    _check_box_masks(united)
    assert any("one folder per class (0, 1)" in note for note in united.notes)


def test_colondb_bmp_release(tmp_path: Path):
    root = tmp_path / "CVC-ColonDB"   # the original site's release: N.bmp, pN.bmp, cN.bmp contours, sN.bmp
    contour = np.zeros((SIDE, SIDE), np.uint8)
    contour[0] = 255
    for frame in (1, 2, 12):
        write_image(root / f"{frame}.bmp", seed=frame)
        write_mask(root / f"p{frame}.bmp", box_mask())
        write_mask(root / f"c{frame}.bmp", contour)
        write_mask(root / f"s{frame}.bmp", 255 - contour)
    assert recognise(root) == "cvc-colondb"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.ids == ["1", "2", "12"] and not any("not used" in n for n in data.notes)
    _check_box_masks(data)


def test_clinicdb_png_tif_mirror(tmp_path: Path):
    root = tmp_path / "CVC-ClinicDB"
    make_clinicdb(root / "TIF", 3)
    for i in range(1, 4):   # PNG/ holds the same frames; a different mask shows which copy was read
        write_image(root / "PNG" / "Original" / f"{i}.png", seed=i)
        write_mask(root / "PNG" / "Ground Truth" / f"{i}.png", np.zeros((SIDE, SIDE), np.uint8))
    assert recognise(root) == "cvc-clinicdb"
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert data.ids == ["1", "2", "3"] and any("PNG" in note for note in data.notes)
    _check_box_masks(data)


def test_download_nested_twice(tmp_path: Path):
    inner = make_kvasir(tmp_path / "dl" / "Kvasir-SEG" / "Kvasir-SEG", [f"c{i:024d}" for i in range(3)])
    (tmp_path / "dl" / "__MACOSX").mkdir()
    data = load_dataset(str(tmp_path / "dl"), 16, cache_dir=tmp_path / "cache")
    assert data.name == "kvasir-seg" and len(data.ids) == 3
    assert any("Kvasir-SEG/Kvasir-SEG" in note for note in data.notes)
    assert load_dataset(f"kvasir-seg:{tmp_path / 'dl'}", 16, cache_dir=tmp_path / "cache").ids == data.ids
    assert scan(inner).root == inner


def test_real_excerpts_nested_and_side_by_side(tmp_path: Path, shared_data: Path):
    nested = tmp_path / "download" / "kvasir-seg" / "Kvasir-SEG"
    nested.parent.mkdir(parents=True)
    os.symlink(shared_data / "Kvasir-SEG", nested)
    data = load_dataset(str(tmp_path / "download"), 32, cache_dir=tmp_path / "cache")
    assert data.name == "kvasir-seg" and len(data.ids) == 5 and data.mask_stats().empty == 0
    both = tmp_path / "data"
    both.mkdir()
    for name in ("Kvasir-SEG", "CVC-ColonDB"):
        os.symlink(shared_data / name, both / name)
    message = _raises(load_dataset, str(both), 32, cache_dir=tmp_path / "cache")
    assert "holds several datasets" in message and "Kvasir-SEG/ (kvasir-seg)" in message
    assert "CVC-ColonDB/ (cvc-colondb)" in message and str(both / "CVC-ColonDB") in message


def test_one_dataset_beside_other_folders(tmp_path: Path):
    make_kvasir(tmp_path / "work" / "Kvasir-SEG", [f"c{i:024d}" for i in range(3)])
    (tmp_path / "work" / "scripts").mkdir()
    (tmp_path / "work" / "scripts" / "train.py").write_text("")
    data = load_dataset(str(tmp_path / "work"), 16, cache_dir=tmp_path / "cache")
    assert data.name == "kvasir-seg" and any("the only dataset" in note and "scripts" in note for note in data.notes)


def test_pranet_test_folder_lists_its_datasets(tmp_path: Path):
    test = tmp_path / "PraNet" / "TestDataset"
    for name in ("CVC-300", "Kvasir"):
        for i in range(2):
            write_image(test / name / "images" / f"{i}.png", seed=i)
            write_mask(test / name / "masks" / f"{i}.png", box_mask())
    message = _raises(load_dataset, str(test), 16, cache_dir=tmp_path / "cache")
    assert "CVC-300/ (generic)" in message and "Kvasir/ (kvasir-seg)" in message
    assert f"pranet:{tmp_path / 'PraNet'}" in message


def test_unrecognised_folder_says_what_it_found(tmp_path: Path):
    root = tmp_path / "odd"
    write_image(root / "photos" / "x1.jpg")
    write_image(root / "photos" / "x2.jpg")
    write_image(root / "annotations" / "x1.png")
    write_image(root / "loose.tif")
    message = _raises(load_dataset, str(root), 16, cache_dir=tmp_path / "cache")
    assert "not recognised" in message and "photos/ (2 image(s) .jpg, e.g. x1.jpg)" in message
    assert "annotations/ (1 image(s) .png" in message and "1 image(s) at the top (loose.tif)" in message
    assert "LAYOUT:PATH" in message and "images/ + masks/" in message



def test_a_folder_named_like_glasses_is_not_glas(tmp_path: Path):
    root = tmp_path / "glasses-seg"
    for i in range(2):
        write_image(root / "images" / f"{i}.jpg", seed=i)
        write_mask(root / "masks" / f"{i}.jpg", box_mask(), rgb=True)   # JPEG noise: "label" would be wrong
    assert recognise(root) == "generic"
    _check_box_masks(load_dataset(str(root), 16, cache_dir=tmp_path / "cache"))


def test_reference_syntax(tmp_path: Path):
    from bench.datasets.refs import FolderRef, SyntheticRef, parse

    ref = parse(f"kvasir-seg:{tmp_path}/K#part?mask=COLOR=0,255,0&split=s.csv&name=K1&seen=no")
    assert ref == FolderRef("kvasir-seg", tmp_path / "K", "part", "color=0,255,0", Path("s.csv"), "K1", False)
    assert parse("synthetic-cell:seed=2,n=40?name=cells") == SyntheticRef("synthetic-cell", 40, 2, label="cells")
    assert parse(str(tmp_path)) == FolderRef(None, tmp_path)
    for bad, words in ((f"{tmp_path}?mask=maybe", "unknown mask rule"), (f"{tmp_path}?colour=1", "bad option"),
                       (f"{tmp_path}?seen=perhaps", "seen=yes or seen=no"),
                       ("synthetic-polyp#x", "no parts and no mask rule")):
        assert words in _raises(parse, bad)
