"""io_socket: kx-sipd's blocking driver (plain sockets and ``selectors``, no asyncio, no threads).

The smallest readable example of driving a ``sansio_sip`` engine; ``Server``
has the same shape and file layout as io_anyio's. The store and the relay are
called inline (see server.py for the trade-off).
"""

from .options import DriverOptions
from .server import DrivenEngine, MessageTrace, Server, serve

__all__ = ["DrivenEngine", "DriverOptions", "MessageTrace", "Server", "serve"]
