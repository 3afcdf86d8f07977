"""``python -m kx_sipd``: the same as the ``kx-sipd`` command."""

from __future__ import annotations

from .cli import main

main(prog_name="kx-sipd")
