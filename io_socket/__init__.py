"""io_socket: kx-sipd's blocking driver (plain sockets and ``selectors``, no asyncio, no threads).

The smallest readable example of driving a ``sansio_sip`` engine: server.py
holds ``Server`` and its loop, with the same shape as io_anyio's (``options.py``
for the bounds, ``server.py`` for the loop); what the loop calls (UDP, TCP, the
back-ends, the shutdown phases) is in private modules beside it. The store and
the relay are called inline (see _backends.py for the trade-off).
"""

from .options import DriverOptions
from .server import DrivenEngine, MessageTrace, Server, serve

__all__ = ["DrivenEngine", "DriverOptions", "MessageTrace", "Server", "serve"]
