"""The decode-once cache (hit, invalidation, atomic entries) and unlabelled pools."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.datasets import dataset_catalog, decode, default_cache_dir, load_dataset, load_pool, synthetic
from bench.datasets.layouts import LAYOUTS
from bench.errors import BenchError


def _make_generic(root: Path, n: int = 4, side: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        mask = np.zeros((side, side), np.uint8)
        mask[: side // 2] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def _forbid(monkeypatch, module, name: str) -> None:
    def boom(*args, **kwargs):
        raise AssertionError(f"{name} called on a cache hit")

    monkeypatch.setattr(module, name, boom)


def test_cache_hit_does_not_decode(tmp_path: Path, monkeypatch):
    root = _make_generic(tmp_path / "set")
    first = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    _forbid(monkeypatch, decode, "decode_pair")
    calls = []
    second = load_dataset(str(root), 16, cache_dir=tmp_path / "cache", progress=lambda d, t: calls.append((d, t)))
    assert np.array_equal(first.images, second.images) and np.array_equal(first.masks, second.masks)
    assert second.fingerprint == first.fingerprint and second.ids == first.ids
    assert calls == [(4, 4)]


def test_cache_invalidated_by_changed_file(tmp_path: Path):
    root = _make_generic(tmp_path / "set")
    first = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert first.masks[2].mean() == pytest.approx(0.5)
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(root / "masks" / "2.png")     # rewrite ...
    stat = (root / "masks" / "2.png").stat()
    os.utime(root / "masks" / "2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # ... and touch
    second = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert second.fingerprint != first.fingerprint
    assert second.masks[2].sum() == 0 and second.masks[1].mean() == pytest.approx(0.5)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_touch_alone_invalidates(tmp_path: Path, monkeypatch):
    root = _make_generic(tmp_path / "set")
    load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    stat = (root / "images" / "0.png").stat()
    os.utime(root / "images" / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _forbid(monkeypatch, decode, "decode_pair")
    with pytest.raises(AssertionError, match="called on a cache hit"):   # a miss: it decodes again
        load_dataset(str(root), 16, cache_dir=tmp_path / "cache")


def test_cache_keyed_by_size_and_relocatable(tmp_path: Path):
    root = _make_generic(tmp_path / "set")
    small = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    large = load_dataset(str(root), 32, cache_dir=tmp_path / "cache")
    assert small.images.shape[-1] == 16 and large.images.shape[-1] == 32
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, copy_function=shutil.copy2)   # same names, sizes, mtimes
    assert load_dataset(str(moved), 16, cache_dir=tmp_path / "cache").fingerprint == small.fingerprint
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_no_temporary_left_and_failed_build_leaves_nothing(tmp_path: Path, monkeypatch):
    root = _make_generic(tmp_path / "set")
    load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]

    def broken(pair, size, rule):
        raise BenchError(f"cannot decode {pair.image}")

    monkeypatch.setattr(decode, "decode_pair", broken)
    with pytest.raises(BenchError):
        load_dataset(str(root), 24, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1   # only the earlier, complete entry


def test_unreadable_entry_is_rebuilt(tmp_path: Path):
    root = _make_generic(tmp_path / "set")
    first = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    entry = next((tmp_path / "cache").iterdir())
    (entry / "images.npy").write_bytes(b"garbage")
    again = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert np.array_equal(first.images, again.images)


def test_synthetic_cache_hit(tmp_path: Path, monkeypatch):
    first = load_dataset("synthetic-gland", 32, cache_dir=tmp_path, n=10)
    _forbid(monkeypatch, synthetic, "generate")
    second = load_dataset("synthetic-gland", 32, cache_dir=tmp_path, n=10)
    assert np.array_equal(first.images, second.images) and second.fingerprint == first.fingerprint
    with pytest.raises(AssertionError):   # another n is another key
        load_dataset("synthetic-gland", 32, cache_dir=tmp_path, n=12)


def test_default_cache_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BENCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "medssl-bench"


# ----------------------------------------------------------------------------------------------
# Pools


def test_pool_folder_recursive_and_cached(tmp_path: Path, monkeypatch):
    root = tmp_path / "hyper-kvasir" / "unlabeled-images"
    for i, sub in enumerate(["a", "a", "b/c"]):
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / sub / f"{i}.jpg")
    (root / "README.txt").write_text("not an image")
    pool = load_pool(str(root), 16, cache_dir=tmp_path / "cache")
    assert pool.shape == (3, 3, 16, 16) and pool.dtype == np.uint8
    assert [int(round(pool[i].mean())) for i in range(3)] == [0, 40, 80]   # natural path order
    _forbid(monkeypatch, decode, "read_pool_image")
    assert np.array_equal(load_pool(str(root), 16, cache_dir=tmp_path / "cache"), pool)


def test_pool_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="holds no images"):
        load_pool(str(tmp_path / "empty"), 16, cache_dir=tmp_path / "cache")
    with pytest.raises(BenchError, match="plain folder of unlabelled images"):
        load_pool(f"kvasir-seg:{tmp_path}", 16, cache_dir=tmp_path / "cache")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BenchError, match=r"cannot decode .*x\.jpg"):
        load_pool(str(tmp_path / "bad"), 16, cache_dir=tmp_path / "cache")


def test_synthetic_pool_is_a_separate_draw(tmp_path: Path):
    pool = load_pool("synthetic-polyp:n=10", 32, cache_dir=tmp_path)
    data = load_dataset("synthetic-polyp", 32, cache_dir=tmp_path, n=10)
    assert pool.shape == (10, 3, 32, 32)
    assert not any(np.array_equal(p, d) for p in pool for d in data.images)
    assert np.array_equal(load_pool("synthetic-polyp:n=10,seed=0", 32, cache_dir=tmp_path), data.images)


def test_catalog_lists_everything():
    names = [name for name, _ in dataset_catalog()]
    assert names[:2] == ["synthetic-polyp", "synthetic-gland"]
    assert all(f"{layout}:PATH" in names for layout in LAYOUTS)
    assert all(description for _, description in dataset_catalog())


# ----------------------------------------------------------------------------------------------
# Integrity: every entry checksummed at write, verified at read, rebuilt when damaged


def _entry_file(cache: Path, name: str) -> Path:
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return entry / name


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF          # in the pixel data, after the .npy header: same size, still a valid .npy
    path.write_bytes(bytes(raw))


def _damage(kind: str, path: Path) -> None:
    if kind == "flip":
        _flip_byte(path)
    elif kind == "shape":
        np.save(path, np.zeros((2, 3), np.uint8))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("kind", ["flip", "shape", "empty"])
def test_damaged_real_entry_is_rebuilt(tmp_path: Path, kind: str, caplog):
    root = _make_generic(tmp_path / "set")
    first = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    expected = (np.array(first.images), np.array(first.masks), first.native_mask(1))
    _damage(kind, _entry_file(tmp_path / "cache", "images.npy"))
    with caplog.at_level("WARNING", logger="bench.datasets"):
        again = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.images, expected[0]) and np.array_equal(again.masks, expected[1])
    assert np.array_equal(again.native_mask(1), expected[2])
    (record,) = [r for r in caplog.records if r.name == "bench.datasets"]
    reason = {"flip": "does not match its checksum", "shape": "checksum", "empty": "empty (0 bytes)"}[kind]
    assert reason in record.getMessage() and "images.npy" in record.getMessage() and "\n" not in record.getMessage()
    assert any("cache entry rebuilt" in note for note in again.notes)
    caplog.clear()
    with caplog.at_level("WARNING", logger="bench.datasets"):   # the rebuilt entry is sound: silent hit
        load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert not caplog.records


def test_damaged_native_masks_and_synthetic_entries(tmp_path: Path, caplog):
    root = _make_generic(tmp_path / "set")
    first = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    _flip_byte(_entry_file(tmp_path / "cache", "native_blob.npy"))
    with caplog.at_level("WARNING", logger="bench.datasets"):
        again = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.native_mask(0), first.native_mask(0)) and "native_blob.npy" in caplog.text
    clean = load_dataset("synthetic-gland", 32, cache_dir=tmp_path / "synth", n=6)
    expected = np.array(clean.masks)
    _flip_byte(_entry_file(tmp_path / "synth", "masks.npy"))
    assert np.array_equal(load_dataset("synthetic-gland", 32, cache_dir=tmp_path / "synth", n=6).masks, expected)


def test_wrong_shape_with_forged_meta_is_rebuilt(tmp_path: Path):
    """A valid .npy of another shape whose meta.json was rewritten to match: the expected shape catches it."""
    import hashlib
    import json

    root = _make_generic(tmp_path / "set")
    first = load_dataset(str(root), 16, cache_dir=tmp_path / "cache")
    path = _entry_file(tmp_path / "cache", "masks.npy")
    np.save(path, np.zeros((4, 8, 8), np.uint8))
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"]["masks"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta["shapes"]["masks"] = [4, 8, 8]
    meta_path.write_text(json.dumps(meta))
    assert np.array_equal(load_dataset(str(root), 16, cache_dir=tmp_path / "cache").masks, first.masks)


def test_damaged_pool_entry_is_rebuilt(tmp_path: Path):
    root = tmp_path / "pool"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    pool = np.array(load_pool(str(root), 16, cache_dir=tmp_path / "cache"))
    _entry_file(tmp_path / "cache", "images.npy").write_bytes(b"")
    assert np.array_equal(load_pool(str(root), 16, cache_dir=tmp_path / "cache"), pool)
