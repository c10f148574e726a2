"""What the runner writes into records besides the numbers (docs/architecture.md): versions and
hardware, kept predictions in the layout the reports read, a job's loss log, a failure's reason."""

from __future__ import annotations

import os
import platform
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded in every record."""
    import lightly
    import timm
    import torchvision

    import bench
    from bench.runtime import cpu_model, usable_cores

    return {
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "timm": timm.__version__, "lightly": lightly.__version__, "bench": bench.__version__,
                     "python": platform.python_version(), "git_commit": git_commit()},
        "hardware": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                     "usable_cores": usable_cores(), "threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }


def git_commit() -> str | None:
    import subprocess

    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prediction_arrays(test_ids: list[str], masks: list[np.ndarray], iou: list[float]) -> dict[str, np.ndarray]:
    """Kept predictions in the layout ``bench.reports.predictions`` reads: ``test_ids``, ``shapes`` (n, 2),
    ``masks`` (each mask ``np.packbits`` in turn, so masks of different sizes fit) and ``iou``."""
    shapes = np.array([m.shape for m in masks], dtype=np.int32).reshape(-1, 2)
    bits = [np.packbits(np.asarray(m, dtype=bool).ravel()) for m in masks]
    return {"test_ids": np.asarray([str(i) for i in test_ids]), "shapes": shapes,
            "masks": np.concatenate(bits) if bits else np.zeros(0, np.uint8),
            "iou": np.asarray(iou, dtype=np.float32)}


def log_csv(rows: list[dict[str, float]]) -> str:
    """A job's loss log as CSV text (``step`` first)."""
    if not rows:
        return ""
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k != "step", k))
    lines = [",".join(keys)] + [",".join(f"{row.get(k, '')}" for k in keys) for row in rows]
    return "\n".join(lines) + "\n"


def reason(err: BaseException) -> str:
    """One line for a failed job or cell: the message of a user-facing error, else type, message, place."""
    from bench.protocol import NonFiniteLoss

    if isinstance(err, (NonFiniteLoss, BenchError)):
        return str(err)
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}"
