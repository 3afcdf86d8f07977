"""io_anyio: the production driver of kx-sipd (AnyIO on asyncio, uvloop or trio).

``Server`` serves one ``sansio_sip`` engine on UDP and TCP; ``serve`` runs one
until SIGINT/SIGTERM. The store and the relay are handed in as objects that
satisfy ``sansio_sip.AccountStore`` and ``sansio_sip.MediaRelay``.
"""

from .options import DriverOptions
from .server import DrivenEngine, MessageTrace, Server, serve

__all__ = ["DrivenEngine", "DriverOptions", "MessageTrace", "Server", "serve"]
