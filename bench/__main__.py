"""``python -m bench`` (also under ``torchrun -m bench``) is the ``bench`` command."""

from bench.cli import app

app(prog_name="bench")
