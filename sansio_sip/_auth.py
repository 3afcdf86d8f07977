"""The authentication decision for REGISTER and INVITE (guide §8, §9).

Given the parsed credentials, the account the store returned and the nonce
machinery, decide the one answer the guide promises, checking in the order
the guide and issue 4 fix:

1. no such user, or suspended       → ``403 Unknown user``
2. realm or response does not match → ``403 Bad credentials``
3. nonce forged (bad MAC)           → a fresh challenge (``401``)
4. nonce expired, or already used by
   another INVITE                   → ``401`` with ``stale=true`` and a new nonce
5. source address outside the
   account's allow-list             → ``403 Source not allowed``

Checking the response before the nonce's age means a wrong password is
reported as such even with an old nonce, and a right one with an old nonce
gets ``stale=true`` so the client retries silently (RFC 2617 §3.2.1).
"""

from __future__ import annotations

import enum
import ipaddress

from ._digest import DigestCredentials, NonceFactory, NonceStatus, NonceTracker, verify_response
from ._model import Account

__all__ = ["AuthOutcome", "decide"]


class AuthOutcome(enum.Enum):
    ACCEPTED = "accepted"
    CHALLENGE = "challenge"
    STALE = "stale"
    UNKNOWN_USER = "unknown-user"
    BAD_CREDENTIALS = "bad-credentials"
    SOURCE_NOT_ALLOWED = "source-not-allowed"


def decide(
    credentials: DigestCredentials,
    account: Account | None,
    *,
    method: str,
    realm: str,
    nonces: NonceFactory,
    single_use: NonceTracker | None,
    source_ip: str,
    wall: float,
) -> AuthOutcome:
    """Return the outcome for ``credentials`` presented with a ``method`` request.

    ``single_use`` is the tracker consulted for requests whose nonce may be
    used only once (INVITE); None for REGISTER, where softphones legitimately
    reuse a nonce with an increasing nonce-count.
    """
    if account is None or not account.active:
        return AuthOutcome.UNKNOWN_USER
    if credentials.realm != realm:
        return AuthOutcome.BAD_CREDENTIALS
    ha1 = account.ha1.get(credentials.algorithm.upper())
    if ha1 is None or not verify_response(credentials, ha1=ha1, method=method):
        return AuthOutcome.BAD_CREDENTIALS
    status = nonces.check(credentials.nonce, wall=wall)
    if status is NonceStatus.INVALID:
        return AuthOutcome.CHALLENGE
    if status is NonceStatus.STALE:
        return AuthOutcome.STALE
    if single_use is not None and not single_use.use(credentials.nonce, wall=wall):
        return AuthOutcome.STALE
    if account.allowed_sources and not _source_allowed(source_ip, account.allowed_sources):
        return AuthOutcome.SOURCE_NOT_ALLOWED
    return AuthOutcome.ACCEPTED


def _source_allowed(source_ip: str, networks: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        return False
    for network in networks:
        try:
            if address in ipaddress.ip_network(network, strict=False):
                return True
        except ValueError:
            continue
    return False
