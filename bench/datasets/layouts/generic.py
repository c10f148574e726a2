"""Any image/mask folder: ``images/`` (or ``image/``, ``img/``) + ``masks/`` (or ``mask/``, ``labelcol/``,
``gt/``, per-class ``masks/0/``), split folders (``train/``, ``test/``, ``val/`` each holding those),
or one folder of ``<id>.png`` beside ``<id>_mask.png``. Masks pair by stem, also as ``<id>_mask``,
``<id>_segmentation`` or ``<id>_anno``. Recognised last, after every named layout.
"""

from __future__ import annotations

from pathlib import Path

from bench.datasets.layouts.common import SEEDED, Layout, Scan, has_image_masks, scan_image_masks

EXPECTS = "images/ + masks/ paired by file stem (any common image extension; also image/, img/, mask/, " \
          "labelcol/, masks/0/, <id>_mask.png, train/ + test/ folders)"


def scan_generic(root: Path) -> Scan:
    return scan_image_masks(root, "generic", "auto", EXPECTS)


LAYOUTS = [Layout("generic", "generic", EXPECTS, f"official where train/ + test/ folders give one, else {SEEDED}",
                  has_image_masks, scan_generic, priority=1000)]
