"""medssl-bench: which self-supervised pretraining helps medical segmentation most when labels are scarce."""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# Idle OpenMP threads sleep instead of spinning: on a machine that is also doing other work, spinning
# threads compete with it for the cores and the step rate collapses. The OpenMP library reads this
# once, when torch is loaded, so it is set here, before the package imports torch; a value the user
# set wins. (Intel's OpenMP also takes PASSIVE as KMP_BLOCKTIME=0.) See bench/runtime.py.
TORCH_LOADED_FIRST = "torch" in _sys.modules  # then the policy below comes too late for this process
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Weights never come from the network at run time: timm looks only in the local hub cache (fast,
# and no retry loop when there is no network). Set HF_HUB_OFFLINE=0 to allow downloads.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
