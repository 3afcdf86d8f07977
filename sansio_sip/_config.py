"""The engine's tunables, in one frozen object (STYLE §3.4: no module-level state).

Defaults and their reasoning:

* T1 = 0.5 s, T2 = 4 s, T4 = 5 s: RFC 3261 §17.1.1.1 and Table 4.
* ``nonce_lifetime`` = 300 s: long enough for a softphone's 401 → retry and
  for Linphone-style re-REGISTER reusing the nonce with a growing nc, short
  enough that a captured nonce is soon useless; matches the guide's
  recommended Register expires (§4.1).
* ``max_transactions`` = 20,000 and ``max_calls`` = 5,000: the engine answers
  503 with Retry-After beyond these rather than grow without bound (DESIGN §7).
* ``ring_timeout`` = 180 s: RFC 3261 §16.6 Timer C (> 3 min) for a proxy;
  a carrier that rings longer is cancelled and the client gets 408.
* ``max_pending_lookups`` = 5,000: requests waiting for the store; past it a
  slow store means 503 at once instead of a growing queue.
* ``register_expires`` = 300 s: the guide's recommended value, granted when
  the client asks for more (no binding is stored, guide §8).
"""

from __future__ import annotations

import attrs

from ._guard import GuardConfig
from ._model import Address

__all__ = ["ALLOWED_METHODS", "EngineConfig"]

ALLOWED_METHODS: tuple[str, ...] = ("REGISTER", "OPTIONS", "INVITE", "ACK", "BYE", "CANCEL")
"""Guide §8: "Only these SIP methods are accepted"; anything else gets 405 with Allow."""


@attrs.frozen(kw_only=True)
class EngineConfig:
    """Everything the engine needs to know that is not a message.

    ``local_names`` are further host names and addresses that name this
    server in a Route or Request-URI (listen addresses, a DNS name); the host
    of ``sip_address`` and the realm always do.
    ``sip_address`` is the address kx-sipd puts in its own Via and Contact
    toward clients and carriers (the advertised public address on a cloud
    host); ``nonce_secret`` signs nonces and must be shared by every process
    and host that may see the retry of a challenged request.
    """

    realm: str = "sip.kx21.com"
    nonce_secret: bytes = attrs.field(repr=False)
    sip_address: Address = ("127.0.0.1", 5060)
    local_names: tuple[str, ...] = ()
    server_name: str = "kx-sipd"
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    nonce_lifetime: float = 300.0
    register_expires: int = 300
    min_register_expires: int = 60
    digest_algorithms: tuple[str, ...] = ("MD5",)
    allowed_methods: tuple[str, ...] = ALLOWED_METHODS
    max_transactions: int = 20_000
    max_calls: int = 5_000
    max_message_size: int = 65_535
    max_headers: int = 256
    max_via_depth: int = 64
    retry_after: int = 5
    echo_number: str = "9196"
    max_call_duration: float = 4 * 3600.0
    ring_timeout: float = 180.0
    uniform_auth_failures: bool = False
    one_device_per_account: bool = False
    max_pending_lookups: int = 5_000
    max_delayed_answers: int = 10_000
    guard: GuardConfig = attrs.field(factory=GuardConfig)
    ladder_limit: int = 64

    @nonce_secret.validator
    def _check_secret(self, _attribute: object, value: bytes) -> None:
        if len(value) < 16:
            raise ValueError("nonce_secret must be at least 16 bytes")
