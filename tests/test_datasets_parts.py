"""The generalisation protocol's data: the PraNet download, ``load_parts``' rule, seen/unseen, leakage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import TestSet, TrainingPool, decode, inspect, load_dataset, load_parts
from bench.datasets.layouts import recognise
from bench.errors import BenchError
from tests.test_datasets_layouts import _check_box_masks, box_mask, make_colondb, make_kvasir, write_image, write_mask

KVASIR_IDS = [f"c{i:024d}" for i in range(100, 104)]
TEST_PARTS = {"CVC-300": 2, "CVC-ClinicDB": 2, "CVC-ColonDB": 3, "ETIS-LaribPolypDB": 2, "Kvasir": 2}


def make_pranet(root: Path, train_dirs: tuple[str, str] = ("image", "mask")) -> Path:
    """PraNet's download: TrainDataset/{image,mask} (Kvasir ids + ClinicDB frame numbers) and TestDataset/<Name>/."""
    for i, name in enumerate(KVASIR_IDS[:2] + ["1", "2", "3"]):
        write_image(root / "TrainDataset" / train_dirs[0] / f"{name}.png", seed=10 + i)
        write_mask(root / "TrainDataset" / train_dirs[1] / f"{name}.png", box_mask())
    for k, (part, count) in enumerate(TEST_PARTS.items()):
        for i in range(count):
            write_image(root / "TestDataset" / part / "images" / f"{i + 1}.png", seed=100 * (k + 1) + i)
            write_mask(root / "TestDataset" / part / "masks" / f"{i + 1}.png", box_mask())
    return root


@pytest.fixture
def pranet(tmp_path: Path) -> Path:
    return make_pranet(tmp_path / "PraNet")


def test_pranet_root_recognised_with_parts(pranet: Path, tmp_path: Path):
    assert recognise(pranet) == "pranet"
    report = inspect(str(pranet))
    assert report.parts == {"train": 5, **TEST_PARTS} and (report.n_train, report.n_test) == (5, 11)
    assert "part        Kvasir: 2 pairs" in report.lines()
    data = load_dataset(str(pranet), 16, cache_dir=tmp_path / "cache")
    assert (data.name, data.split, len(data.train), len(data.test)) == ("pranet", "official", 5, 11)
    assert data.ids[0] == "train/1" and "Kvasir/1" in data.ids
    _check_box_masks(data)


def test_pranet_plural_train_folders(tmp_path: Path):
    root = make_pranet(tmp_path / "PraNet", ("images", "masks"))
    assert inspect(str(root)).parts["train"] == 5


def test_pranet_part_refs(pranet: Path, tmp_path: Path):
    kvasir = load_dataset(f"pranet:{pranet}#kvasir", 16, cache_dir=tmp_path / "cache")
    assert kvasir.name == "kvasir-seg" and kvasir.ids == ["1", "2"]
    train = load_dataset(f"{pranet}#train", 16, cache_dir=tmp_path / "cache")
    assert train.name == "generic" and len(train.ids) == 5
    with pytest.raises(BenchError, match="no part 'Colon'; its parts: train, CVC-300"):
        load_dataset(f"pranet:{pranet}#Colon", 16, cache_dir=tmp_path / "cache")
    with pytest.raises(BenchError, match="kvasir-seg has no parts"):
        load_dataset(f"kvasir-seg:{pranet / 'TestDataset' / 'Kvasir'}#x", 16, cache_dir=tmp_path / "cache")


def test_pranet_protocol(pranet: Path, tmp_path: Path):
    pool, tests = load_parts([f"pranet:{pranet}"], [f"pranet:{pranet}"], 16, cache_dir=tmp_path / "cache")
    assert isinstance(pool, TrainingPool) and pool.counts == {"pranet": 5} and len(pool.train) == 5
    assert pool.images.shape == (5, 3, 16, 16) and pool.ids[0] == "pranet/train/1" and not len(pool.test)
    assert {name: len(t.ids) for name, t in tests.items()} == TEST_PARTS
    assert {name for name, t in tests.items() if t.seen} == {"Kvasir", "CVC-ClinicDB"}
    kvasir = tests["Kvasir"]
    assert isinstance(kvasir, TestSet) and list(kvasir.test) == [0, 1] and not len(kvasir.train)
    _check_box_masks(kvasir)
    direct = decode.read_mask(pranet / "TestDataset" / "Kvasir" / "masks" / "2.png")
    assert np.array_equal(kvasir.native_mask(1), direct) and not kvasir.native_is_resized


def test_pranet_parts_named_one_by_one(pranet: Path, tmp_path: Path):
    pool, tests = load_parts([f"pranet:{pranet}#train"], [f"pranet:{pranet}#CVC-300", f"pranet:{pranet}#Kvasir",
                                                          f"{pranet / 'TestDataset' / 'CVC-ColonDB'}?name=ColonDB"],
                             16, cache_dir=tmp_path / "cache")
    assert pool.counts == {"train": 5}
    assert {name: t.seen for name, t in tests.items()} == {"CVC-300": False, "Kvasir": True, "ColonDB": False}


def test_rule_train_only_test_only_both(tmp_path: Path):
    a = make_kvasir(tmp_path / "Kvasir-SEG", [f"c{i:024d}" for i in range(10)])
    b = make_colondb(tmp_path / "CVC-ColonDB", [1, 2, 3, 4, 5])
    c = tmp_path / "other"
    for i in range(5):
        write_image(c / "images" / f"x{i}.png", seed=50 + i)
        write_mask(c / "masks" / f"x{i}.png", box_mask())
    pool, tests = load_parts([str(a), str(c)], [str(b), str(a)], 16, cache_dir=tmp_path / "cache", split_seed=3)
    own = load_dataset(str(a), 16, cache_dir=tmp_path / "cache", split_seed=3)
    assert pool.counts == {"kvasir-seg": len(own.train), "generic": 5}        # a: its split; c: all
    assert pool.ids[: len(own.train)] == [f"kvasir-seg/{own.ids[i]}" for i in own.train]
    assert np.array_equal(pool.sources, [0] * len(own.train) + [1] * 5)
    assert list(tests) == ["cvc-colondb", "kvasir-seg"]
    assert len(tests["cvc-colondb"].ids) == 5 and tests["cvc-colondb"].split == "all images"   # b: all
    assert tests["kvasir-seg"].ids == [own.ids[i] for i in own.test] and tests["kvasir-seg"].seen
    assert not tests["cvc-colondb"].seen
    assert pool.mask_stats().n == len(pool.ids) and pool.native_mask(0).shape == (32, 32)


def test_seen_by_layout_and_override(tmp_path: Path):
    a = make_kvasir(tmp_path / "Kvasir-SEG", [f"c{i:024d}" for i in range(4)])
    b, c = tmp_path / "kvasir-copy", tmp_path / "kvasir-other"
    for k, (root, start) in enumerate(((b, 4), (c, 6))):
        for i in range(start, start + 2):   # other pixels than a's (make_kvasir seeds by position)
            write_image(root / "images" / f"c{i:024d}.jpg", seed=100 * (k + 1) + i)
            write_mask(root / "masks" / f"c{i:024d}.jpg", box_mask(), rgb=True)
    _, tests = load_parts([str(a)], [str(b), f"{c}?name=unseen-copy&seen=no"], 16, cache_dir=tmp_path / "cache")
    assert tests["kvasir-seg"].seen and not tests["unseen-copy"].seen


def test_synthetic_parts(tmp_path: Path):
    pool, tests = load_parts(["synthetic-polyp", "synthetic-gland"], ["synthetic-polyp", "synthetic-skin:seed=4"],
                             32, cache_dir=tmp_path, n=10)
    assert pool.counts == {"synthetic-polyp": 8, "synthetic-gland": 10}
    assert (len(tests["synthetic-polyp"].ids), tests["synthetic-polyp"].seen) == (2, True)
    assert (len(tests["synthetic-skin"].ids), tests["synthetic-skin"].seen) == (10, False)
    assert np.array_equal(pool.native_mask(9), pool.masks[9] == 1)   # synthetic: native = resized
    assert tests["synthetic-skin"].native_is_resized


def test_leakage_and_bad_lists(tmp_path: Path, pranet: Path):
    full = tmp_path / "Kvasir-SEG"      # the full dataset holds PraNet's Kvasir test images too
    for name in ("1", "2"):
        (full / "images").mkdir(parents=True, exist_ok=True)
        (full / "masks").mkdir(parents=True, exist_ok=True)
        shutil.copy(pranet / "TestDataset" / "Kvasir" / "images" / f"{name}.png", full / "images" / f"k{name}.png")
        shutil.copy(pranet / "TestDataset" / "Kvasir" / "masks" / f"{name}.png", full / "masks" / f"k{name}.png")
    write_image(full / "images" / "k3.png", seed=999)
    write_mask(full / "masks" / "k3.png", box_mask())
    with pytest.raises(BenchError, match="test set Kvasir: 2 of 2 images are also training images"):
        load_parts([str(full)], [f"pranet:{pranet}#Kvasir"], 16, cache_dir=tmp_path / "cache")
    with pytest.raises(BenchError, match="lists 'synthetic-polyp' twice"):
        load_parts(["synthetic-polyp", "synthetic-polyp"], ["synthetic-gland"], 16, cache_dir=tmp_path)
    with pytest.raises(BenchError, match="at least one test dataset"):
        load_parts(["synthetic-polyp"], [], 16, cache_dir=tmp_path)
    with pytest.raises(BenchError, match="two test sets are named 'synthetic-polyp'"):
        load_parts(["synthetic-gland"], ["synthetic-polyp", "synthetic-polyp:seed=3"], 16, cache_dir=tmp_path, n=4)


def test_real_excerpts_as_parts(tmp_path: Path, shared_data: Path):
    kvasir, colondb = shared_data / "Kvasir-SEG", shared_data / "CVC-ColonDB"
    pool, tests = load_parts([str(kvasir)], [str(colondb), str(kvasir)], 32, cache_dir=tmp_path)
    assert pool.counts == {"kvasir-seg": 4} and pool.mask_stats().empty == 0
    assert {name: (len(t.ids), t.seen) for name, t in tests.items()} == {"cvc-colondb": (8, False),
                                                                          "kvasir-seg": (1, True)}
    colon = tests["cvc-colondb"]
    i = colon.ids.index("77")
    assert colon.native_size(i) == (500, 574)
    assert np.array_equal(colon.native_mask(i), decode.read_mask(colondb / "p77.tiff"))
