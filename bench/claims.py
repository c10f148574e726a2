"""Claims: which process computes a job or cell right now, so that processes sharing a run folder
(two ``bench run``, ``--workers``, SLURM tasks) compute each item once (docs/architecture.md).

A claim is a file ``<out>/claims/<item-id>`` created atomically and exclusively (a hard link of a
complete temporary file, which fails if the name exists) holding the owner's pid, host, start time
and a nonce. While the owner works, a thread touches the file (its heartbeat). A claim is stale, and
taken over, when its owner is on this host and no longer runs, when it is this process's own
leftover, or when its heartbeat is older than ``stale_after_s`` (an owner on another host).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.files import file_mode, io_error, make_dir

_HELD: set[str] = set()  # claim files this process holds (a leftover with our pid is not ours)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


class Claims:
    """The claims of one run folder."""

    def __init__(self, folder: Path, report: Callable[[str], None], stale_after_s: float = 600.0,
                 heartbeat_s: float = 30.0):
        self.folder = Path(folder)
        self.report = report
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.host = socket.gethostname()

    @contextlib.contextmanager
    def hold(self, item_id: str) -> Iterator[bool]:
        """Yield True while this process holds ``item_id``, False if a live process holds it."""
        path = self.folder / item_id
        nonce = self._acquire(path)
        if nonce is None:
            yield False
            return
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(path, stop, self.heartbeat_s), daemon=True)
        beat.start()
        try:
            yield True
        finally:
            stop.set()
            beat.join()
            self._release(path, nonce)

    def wait(self, item_id: str, poll_s: float = 0.5) -> None:
        path = self.folder / item_id
        while True:
            holder = _read(path)
            if holder is None or self._stale(path, holder):
                return
            time.sleep(poll_s)

    def live(self) -> dict[str, str]:
        if not self.folder.is_dir():
            return {}
        out = {}
        for path in self.folder.iterdir():
            holder = _read(path)
            if path.name.startswith(".") or holder is None or self._stale(path, holder):
                continue
            out[path.name] = f"{holder.get('host')} {holder.get('pid')} {holder.get('started')}"
        return out

    # --- internals ------------------------------------------------------------------------------
    def _acquire(self, path: Path) -> str | None:
        make_dir(self.folder)
        for _ in range(5):
            nonce = uuid.uuid4().hex
            info = {"pid": os.getpid(), "host": self.host, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "nonce": nonce}
            if self._create(path, info):
                _HELD.add(str(path))
                return nonce
            holder = _read(path)
            if holder is None:  # released meanwhile: try again
                continue
            if not self._stale(path, holder):
                return None
            self._take_over(path, holder)
        return None

    def _create(self, path: Path, info: dict[str, Any]) -> bool:
        """Create ``path`` with ``info`` only if it does not exist (atomic, complete content)."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".claim.", dir=self.folder)
            with os.fdopen(fd, "w") as handle:
                json.dump(info, handle)
            os.chmod(tmp, file_mode())
        except OSError as err:
            raise io_error(path, err) from None
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise io_error(path, err) from None
            return _create_exclusive(path, info)  # a file system without hard links
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _stale(self, path: Path, holder: dict[str, Any]) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int):
            if pid == os.getpid():
                return str(path) not in _HELD
            if not pid_alive(pid):
                return True
        return age > self.stale_after_s

    def _take_over(self, path: Path, holder: dict[str, Any]) -> None:
        """Remove a stale claim; if a fresh one replaced it meanwhile, put that one back."""
        aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved is not None and moved.get("nonce") != holder.get("nonce"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        else:
            self.report(f"claims/{path.name}: took over the stale claim of pid {holder.get('pid')} on "
                        f"{holder.get('host')} (started {holder.get('started')})")
        aside.unlink(missing_ok=True)

    def _release(self, path: Path, nonce: str) -> None:
        _HELD.discard(str(path))
        holder = _read(path)
        if holder is not None and holder.get("nonce") == nonce:
            path.unlink(missing_ok=True)


def _create_exclusive(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle)
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """A claim's content; None if there is none. An unreadable claim counts with no owner (its age decides)."""
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _heartbeat(path: Path, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        with contextlib.suppress(OSError):
            os.utime(path)
