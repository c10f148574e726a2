"""medssl-bench: which self-supervised pretraining helps medical segmentation most when labels are scarce."""

__version__ = "0.1.0"
