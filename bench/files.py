"""Files of a run folder (docs/architecture.md): atomic writes with the user's umask, one-line errors for
I/O failures (disk full, read-only, a file where a folder should be), the one checkpoint reader, and
the checksums that records carry."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError

CHECKSUM = "checksum"


# --- files: atomic, with the user's umask, one-line errors ------------------------------------------

def file_mode() -> int:
    """0o666 minus the process umask (``mkstemp`` creates 0600; records should look like any file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FIXES = {errno.ENOSPC: "free some space or pass another --out", errno.EDQUOT: "free some quota or pass another --out",
          errno.EROFS: "pass a writable folder as --out", errno.EACCES: "pass a folder you can write to as --out",
          errno.EPERM: "pass a folder you can write to as --out",
          errno.ENOTDIR: "a part of the path is a file, not a folder; pass a folder as --out",
          errno.EEXIST: "it is a file, not a folder; pass a folder as --out"}


def io_error(path: Path, err: OSError, action: str = "write") -> BenchError:
    """A one-line error naming ``path``, the cause and the fix."""
    cause = err.strerror or str(err)
    fix = _FIXES.get(err.errno or 0, "check the path and try again")
    return BenchError(f"cannot {action} {path}: {cause}; {fix}")


def make_dir(path: Path) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise io_error(path, err, "create the folder") from None


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[str]:
    """A temporary file beside ``path``, renamed onto it (with the user's umask) when the block ends
    without error and removed otherwise; OSError becomes a one-line BenchError."""
    make_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise io_error(path, err) from None
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise io_error(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    with _temporary(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: Path, state: dict[str, Any]) -> str:
    """``torch.save`` atomically; returns the file's sha256 (hashed before the rename)."""
    path = Path(path)
    with _temporary(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as err:  # torch's zip writer reports a failed write as RuntimeError
            raise BenchError(f"cannot write {path}: {str(err).splitlines()[0]}; check free space and --out") from None
        digest = file_sha256(Path(tmp))
    return digest


def load_weights(path: Path) -> dict[str, Any]:
    """The one checkpoint reader: ``torch.load(weights_only=True)`` on CPU, one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint {path} does not exist; pass scratch, imagenet or an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign or unsafe pickles all land here
        why = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise BenchError(f"checkpoint {path} cannot be read ({why}); replace it, or delete it and rerun") from None
    if not isinstance(state, dict):
        raise BenchError(f"checkpoint {path} is not a state dict (a {type(state).__name__}); save model.state_dict()")
    return state


def read_json(path: Path) -> Any:
    """Parse a JSON file; a file that is not UTF-8 JSON is a one-line BenchError naming it."""
    obj, why = parse_json_file(Path(path))
    if why is not None:
        raise BenchError(f"cannot read {path}: {why}")
    return obj


def parse_json_file(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_bytes().decode("utf-8")), None
    except FileNotFoundError:
        return None, "it does not exist"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at line {err.lineno})"
    except OSError as err:
        raise io_error(path, err, "read") from None


# --- checksums of records ---------------------------------------------------------------------------

def checksum(obj: dict[str, Any]) -> str:
    """sha256 of a record's content as written (without its own ``checksum`` key)."""
    clean = json.loads(json.dumps({k: v for k, v in obj.items() if k != CHECKSUM}, default=str))
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def with_checksum(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, CHECKSUM: checksum(obj)}


def checksum_problem(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object"
    if CHECKSUM in obj and obj[CHECKSUM] != checksum(obj):
        return "its checksum does not match its content"
    return None


