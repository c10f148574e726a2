"""Seeded splits, split files (train/test and grouped), nested label fractions and split hashes."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from bench.datasets import label_fraction, load_dataset, split_hash
from bench.datasets.splits import grouped_split, natural_key, read_split_file, seeded_split, seeded_split_name
from bench.errors import BenchError


def test_seeded_split_sizes_and_disjoint():
    # test = max(1, round(0.2·n)): 10 → 2, 5 → 1, 2 → 1, 1000 → 200, 7 → 1 (round(1.4))
    for n, n_test in [(10, 2), (5, 1), (2, 1), (1000, 200), (7, 1), (8, 2)]:
        train, test = seeded_split(n, seed=0)
        assert len(test) == n_test and len(train) == n - n_test
        assert np.intersect1d(train, test).size == 0
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(n))
        assert train.dtype == np.int64 and test.dtype == np.int64
        assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()


def test_seeded_split_reproducible_and_seeded():
    a_train, a_test = seeded_split(50, seed=3)
    b_train, b_test = seeded_split(50, seed=3)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_test, b_test)
    tests = {tuple(seeded_split(50, seed=s)[1]) for s in range(5)}
    assert len(tests) == 5
    assert seeded_split_name(3) == "seeded 80/20 (seed 3)"


def test_split_needs_two_items():
    with pytest.raises(BenchError, match="at least 2"):
        seeded_split(1)


def test_load_dataset_split_seed(tmp_path):
    a = load_dataset("synthetic-polyp", 32, cache_dir=tmp_path, n=20, split_seed=0)
    b = load_dataset("synthetic-polyp", 32, cache_dir=tmp_path, n=20, split_seed=1)
    assert (len(a.train), len(a.test)) == (16, 4) and a.split == "seeded 80/20 (seed 0)"
    assert b.split == "seeded 80/20 (seed 1)" and not np.array_equal(a.test, b.test)
    assert np.array_equal(a.images, b.images)   # the same data, only the split changes
    again = load_dataset("synthetic-polyp", 32, cache_dir=tmp_path, n=20, split_seed=0)
    assert np.array_equal(a.test, again.test)


def test_natural_order():
    assert sorted(["10", "2", "1", "p3"], key=natural_key) == ["1", "2", "10", "p3"]
    assert sorted(["testA_10", "testA_9", "testB_1"], key=natural_key) == ["testA_9", "testA_10", "testB_1"]


# ----------------------------------------------------------------------------------------------
# Label fractions


def test_fraction_sizes():
    train = np.arange(100, 980, dtype=np.int64)   # 880 training images, as Kvasir-SEG
    # ceil(0.05·880) = 44 exactly (0.05·880 is 44.000000000000007 in floating point), 0.1 → 88
    assert len(label_fraction(train, 0.05, 0)) == 44
    assert len(label_fraction(train, 0.1, 0)) == 88
    assert len(label_fraction(np.arange(160), 0.05, 0)) == 8
    assert len(label_fraction(np.arange(85), 0.05, 0)) == math.ceil(4.25) == 5   # GlaS train
    assert len(label_fraction(np.arange(3), 0.05, 0)) == 1                       # at least one
    assert np.array_equal(label_fraction(train, 1.0, 0), train)


def test_fractions_nested_deterministic_subset():
    train = np.random.default_rng(1).choice(1000, 300, replace=False)
    for seed in (0, 1, 2):
        subsets = [label_fraction(train, f, seed) for f in (0.05, 0.1, 0.2, 0.5, 1.0)]
        for small, large in zip(subsets, subsets[1:], strict=False):
            assert set(small) < set(large)
        assert set(subsets[-1]) == set(train)
        assert np.array_equal(subsets[0], label_fraction(train, 0.05, seed))
        assert all((np.diff(s) > 0).all() and s.dtype == np.int64 for s in subsets)
    # per (train set, fraction, seed): the order the training indices come in does not matter
    shuffled = np.random.default_rng(5).permutation(train)
    assert np.array_equal(label_fraction(shuffled, 0.1, 0), label_fraction(train, 0.1, 0))
    assert not np.array_equal(label_fraction(train, 0.1, 0), label_fraction(train, 0.1, 1))


@pytest.mark.parametrize("fraction", [1.5, 0, -0.1, float("nan"), "a"])
def test_fraction_out_of_range(fraction):
    with pytest.raises(BenchError, match=r"is not in \(0, 1\]; use e.g. 0.05"):
        label_fraction(np.arange(10), fraction, 0)


def test_fraction_message_exact():
    with pytest.raises(BenchError) as info:
        label_fraction(np.arange(10), 1.5, 0)
    assert str(info.value) == "fraction 1.5 is not in (0, 1]; use e.g. 0.05"


def test_fraction_of_empty_train():
    with pytest.raises(BenchError, match="training split is empty"):
        label_fraction(np.array([], dtype=np.int64), 0.1, 0)


def test_split_hash():
    expected = hashlib.sha256(np.array([1, 5, 9], dtype="<i8").tobytes()).hexdigest()[:12]
    assert split_hash(np.array([9, 1, 5])) == expected            # order-insensitive
    assert len(expected) == 12 and split_hash(np.array([1, 5, 10])) != expected
    assert split_hash([1, 5, 9]) == expected


# ----------------------------------------------------------------------------------------------
# Split files


def _frames(root, n: int = 10):
    from tests.test_datasets_layouts import box_mask, write_image, write_mask

    for i in range(1, n + 1):
        write_image(root / "images" / f"{i}.png", seed=i)
        write_mask(root / "masks" / f"{i}.png", box_mask())
    return root


def test_split_file_train_test(tmp_path):
    root = _frames(tmp_path / "set")
    csv = tmp_path / "split.csv"
    csv.write_text("id,split\n" + "".join(f"{i}.png,{'test' if i in (2, 7) else 'train'}\n" for i in range(1, 11))
                   + "99,test\n")
    data = load_dataset(f"{root}?split={csv}", 16, cache_dir=tmp_path / "cache")
    assert [data.ids[i] for i in data.test] == ["2", "7"] and len(data.train) == 8
    digest = hashlib.sha256(csv.read_bytes()).hexdigest()[:8]
    assert data.split == f"split file split.csv (sha {digest})"
    assert any("1 id(s) of split file split.csv are not in this dataset" in note for note in data.notes)
    same = load_dataset(str(root), 16, cache_dir=tmp_path / "cache", split_file=csv)
    assert np.array_equal(same.test, data.test)


def test_split_file_overrides_an_official_split(tmp_path):
    from tests.test_datasets_layouts import make_glas

    root = make_glas(tmp_path / "glas", train=2, test_a=1, test_b=1)
    csv = tmp_path / "mine.csv"
    csv.write_text("ID,Split\ntrain_1,test\ntrain_2,train\ntestA_1,train\ntestB_1,train\n")
    data = load_dataset(str(root), 16, cache_dir=tmp_path / "cache", split_file=csv)
    assert [data.ids[i] for i in data.test] == ["train_1"] and data.split.startswith("split file mine.csv")


def test_grouped_split_keeps_groups_together(tmp_path):
    root = _frames(tmp_path / "clinic", 12)
    csv = tmp_path / "sequences.csv"
    groups = {i: f"seq{(i - 1) // 3 + 1}" for i in range(1, 13)}          # 4 sequences of 3 frames
    csv.write_text("id,group\n" + "".join(f"{i},{g}\n" for i, g in groups.items()))
    for seed in range(6):
        data = load_dataset(f"{root}?split={csv}", 16, cache_dir=tmp_path / "cache", split_seed=seed)
        test_groups = {groups[int(data.ids[i])] for i in data.test}
        train_groups = {groups[int(data.ids[i])] for i in data.train}
        assert not test_groups & train_groups and len(data.test) == 3     # round(0.2·12) = 2 → one group of 3
        assert data.split.startswith("grouped by sequences.csv") and "4 groups" in data.split
    splits = {tuple(load_dataset(f"{root}?split={csv}", 16, cache_dir=tmp_path / "cache", split_seed=s).test)
              for s in range(6)}
    assert len(splits) > 1                                                # the seed chooses the groups


def test_grouped_split_function():
    groups = ["a"] * 5 + ["b"] * 1 + ["c"] * 4
    train, test = grouped_split(groups, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    assert len({groups[i] for i in test} & {groups[i] for i in train}) == 0 and len(test) >= 2
    with pytest.raises(BenchError, match="at least 2 groups"):
        grouped_split(["a", "a"], seed=0)


@pytest.mark.parametrize("content, words", [
    ("name,split\n1,train\n", "needs id and one of split"),
    ("id,split,group\n1,train,a\n", "needs id and one of split"),
    ("id,split\n1,validation\n", "split 'validation'; use train or test"),
    ("id,split\n1,train\n1,test\n", "listed twice"),
    ("id,split\n", "lists no images"),
])
def test_bad_split_files(tmp_path, content, words):
    csv = tmp_path / "s.csv"
    csv.write_text(content)
    with pytest.raises(BenchError, match=words):
        read_split_file(csv)


def test_split_file_must_cover_every_image(tmp_path):
    root = _frames(tmp_path / "set", 4)
    csv = tmp_path / "s.csv"
    csv.write_text("id,split\n1,train\n2,test\n")
    with pytest.raises(BenchError, match=r"gives nothing for 2 of 4 image\(s\) \(3, 4\)"):
        load_dataset(f"{root}?split={csv}", 16, cache_dir=tmp_path / "cache")
    csv.write_text("id,split\n1,train\n2,train\n3,train\n4,train\n")
    with pytest.raises(BenchError, match="no image on the test side"):
        load_dataset(f"{root}?split={csv}", 16, cache_dir=tmp_path / "cache")
    with pytest.raises(BenchError, match="cannot read split file"):
        load_dataset(f"{root}?split={tmp_path / 'missing.csv'}", 16, cache_dir=tmp_path / "cache")
