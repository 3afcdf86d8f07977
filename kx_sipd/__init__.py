"""kx_sipd: the kx-sipd application: the ``kx-sipd`` command (``cli``), the
server's settings (``settings``), the SQLite store of accounts, routes and call
records (``store``), and the wiring of engine, driver and relay (``app``).

Importing this package starts nothing and opens nothing.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
