"""sansio_sip: the pure SIP protocol engine of kx-sipd.

No sockets, no clock, no randomness of its own: the engine is fed bytes and
time and returns actions (DESIGN.md §2). What this module exports is the
public API; every other name is private.
"""

from . import (
    _actions,
    _config,
    _digest,
    _engine,
    _errors,
    _events,
    _framing,
    _guard,
    _headers,
    _message,
    _model,
    _sdp,
    _seams,
    _timers,
    _transaction,
    _uri,
)
from ._actions import *  # noqa: F403
from ._config import *  # noqa: F403
from ._digest import *  # noqa: F403
from ._engine import *  # noqa: F403
from ._errors import *  # noqa: F403
from ._events import *  # noqa: F403
from ._framing import *  # noqa: F403
from ._guard import *  # noqa: F403
from ._headers import *  # noqa: F403
from ._message import *  # noqa: F403
from ._model import *  # noqa: F403
from ._sdp import *  # noqa: F403
from ._seams import *  # noqa: F403
from ._timers import *  # noqa: F403
from ._transaction import *  # noqa: F403
from ._uri import *  # noqa: F403

__all__ = [
    *_actions.__all__,
    *_config.__all__,
    *_digest.__all__,
    *_engine.__all__,
    *_errors.__all__,
    *_headers.__all__,
    *_message.__all__,
    *_model.__all__,
    *_sdp.__all__,
    *_seams.__all__,
    *_uri.__all__,
    *_events.__all__,
    *_framing.__all__,
    *_guard.__all__,
    *_timers.__all__,
    *_transaction.__all__,
]
