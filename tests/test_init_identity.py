"""Issue 15: a pretraining ``init`` given as a checkpoint file enters the identity by its content (sha256),
not by its path: a changed file at the same path is a new job (and new cells), an unchanged one is not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bench.grid import build_grid, init_identity
from bench.spec import parse_yaml, spec_from_dict
from tests.conftest import TINY_SPEC


def spec_with_init(init: str):
    raw = parse_yaml(TINY_SPEC, "tiny")
    raw["init"] = init
    return spec_from_dict(raw)  # with resources: the file must exist


def write(path: Path, data: bytes, mtime_s: int) -> Path:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))  # distinct times: the hash cache keys on them
    return path


def ids(init: str) -> tuple[str, dict[str, str]]:
    grid = build_grid(spec_with_init(init))
    (job,) = grid.jobs
    return job.id, {c.label: c.id for c in grid.cells}


def test_changed_file_at_the_same_path_is_a_new_job_and_new_cells(tmp_path):
    path = write(tmp_path / "weights.pth", b"first weights" * 100, 1_000_000)
    job, cells = ids(str(path))
    assert ids(str(path)) == (job, cells), "an unchanged file keeps its ids"
    write(path, b"other weights" * 100, 2_000_000)  # same size, other bytes
    job2, cells2 = ids(str(path))
    assert job2 != job, "a changed file at the same path is a new pretraining job"
    assert cells2["byol"] != cells["byol"], "and the cells fine-tuned from it are new"
    assert cells2["scratch"] == cells["scratch"], "cells that do not start from the file keep their ids"
    write(path, b"first weights" * 100, 3_000_000)  # the first content again: its job again
    assert ids(str(path)) == (job, cells)


def test_the_identity_is_the_content_and_the_job_reads_the_path(tmp_path):
    data = b"the same weights" * 50
    (tmp_path / "a").mkdir()
    here = write(tmp_path / "a" / "w.pth", data, 1_000_000)
    there = write(tmp_path / "elsewhere.pt", data, 4_000_000)
    assert ids(str(here)) == ids(str(there)), "the same bytes at another path are the same job (by design)"
    grid = build_grid(spec_with_init(str(here)))
    job = grid.jobs[0]
    assert job.config["init"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert str(here) not in str(job.config), "the path is not part of the identity"
    assert job.init == str(here), "the job still loads the file from its path"


def test_named_inits_keep_their_name():
    assert init_identity("scratch") == "scratch" and init_identity("imagenet") == "imagenet"
    grid = build_grid(spec_with_init("scratch"))
    assert grid.jobs[0].config["init"] == "scratch"
