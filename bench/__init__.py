"""medssl-bench: which self-supervised pretraining helps medical segmentation most when labels are scarce."""

__version__ = "0.1.0"

import os as _os

# Weights never come from the network at run time: timm looks only in the local hub cache (fast,
# and no retry loop when there is no network). Set HF_HUB_OFFLINE=0 to allow downloads.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
