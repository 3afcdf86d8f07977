"""What the engine's transaction users share: the context kept on every
server transaction, and the one way of answering a request.

The transaction layer keeps an opaque ``owner`` slot on each transaction;
the engine stores a ``ServerContext`` there: the To tag it answers with (so
a 401, its retransmissions and a later final agree, RFC 3261 §8.2.6.2),
whether a final answer went out, and the call the transaction belongs to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs

from ._actions import Log
from ._headers import KNOWN_METHODS, Via
from ._message import Request, make_response
from ._seams import Entropy
from ._transaction import ServerTransaction, TransactionLayer

__all__ = ["Responder", "ServerContext", "context_of"]


@attrs.define(slots=True, eq=False)
class ServerContext:
    to_tag: str | None = None
    final: bool = False
    account: str | None = None  # the username of its credentials, once seen
    stamped_via: str | None = None  # the top Via with received/rport, once computed
    call: Any = None  # the _call.Call this transaction belongs to, if any


def context_of(transaction: ServerTransaction) -> ServerContext:
    """The engine's context on ``transaction`` (created on first use)."""
    owner = transaction.owner
    if isinstance(owner, ServerContext):
        return owner
    context = ServerContext()
    transaction.owner = context
    return context


class Responder:
    """Builds a response to a request and hands it to its server transaction."""

    def __init__(
        self,
        transactions: TransactionLayer,
        entropy: Entropy,
        counters: Counter[str],
        server_name: str,
    ) -> None:
        self._transactions = transactions
        self._entropy = entropy
        self._counters = counters
        self._server_name = server_name

    def respond(
        self,
        transaction: ServerTransaction,
        request: Request,
        code: int,
        reason: str,
        *,
        now: float,
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
        to_tag: str | None = None,
    ) -> Sequence[object]:
        """Answer ``request``; returns what the transaction layer returned
        (sends and events) for the caller to dispatch, and for a final answer
        the ``Log`` of the transaction's outcome (issue 3 §6: time, Call-ID,
        method, account, source, status).

        Every response but 100 carries a To tag (§8.2.6.2); the transaction
        keeps the tag it first used.
        """
        context = context_of(transaction)
        tag: str | None = None
        request_tag = request.to.tag
        if code != 100 and request_tag is None:
            tag = to_tag or context.to_tag or self._entropy(6).hex()
            context.to_tag = tag
        final = code >= 200
        if final:
            context.final = True
            headers = (*headers, ("Server", self._server_name))
        # §18.2.1 / RFC 3581 §4: received and rport belong in the answer's copy
        # of the top Via; the request itself is left as received (its parsed
        # headers stay cached).
        vias = request.vias
        if len(vias) == 1 and not any(_is_content_length(name) for name, _ in headers):
            # The usual shape (one Via from a client): the answer written
            # straight from the request's fields, with the request's
            # already-parsed Via stamped once per transaction.
            data = _response_bytes(
                request, code, reason, self._stamped(vias[0], transaction), tag, headers, body
            )
        else:
            data = self._built(transaction, request, code, reason, tag, headers, body)
        self._counters[_COUNTER_KEYS.get(code) or f"responses_out.{code}"] += 1
        method = request.method
        key = _ANSWER_KEYS.get((method, code))
        if key is None:
            key = f"answered.{method if method in KNOWN_METHODS else 'other'}.{code}"
        self._counters[key] += 1
        items: list[object] = list(
            self._transactions.respond_with(
                transaction, code, data, to_tag=tag or request_tag, now=now
            )
        )
        if final:
            source = transaction.source
            items.append(
                Log(
                    level="info",
                    event="transaction.answered",
                    fields=(
                        ("call_id", request.call_id),
                        ("method", request.method),
                        ("account", context.account),
                        ("source", _format(source)),
                        ("transport", transaction.transport.value),
                        ("status", code),
                        ("reason", reason),
                    ),
                )
            )
        return items

    def _built(
        self,
        transaction: ServerTransaction,
        request: Request,
        code: int,
        reason: str,
        tag: str | None,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
    ) -> bytes:
        """The general path: ``make_response``, every Via copied and the top one stamped."""
        response = make_response(request, code, reason, to_tag=tag, headers=headers, body=body)
        vias = request.vias
        if len(vias) == 1:
            response.headers.set("Via", self._stamped(vias[0], transaction))
        else:
            self._transactions.stamp_via(response, transaction.source)
        return bytes(response)

    def _stamped(self, via: Via, transaction: ServerTransaction) -> str:
        """The stamped top Via as text, computed once per transaction (a 100
        Trying, the final answer and its retransmissions carry the same one)."""
        context = context_of(transaction)
        stamped = context.stamped_via
        if stamped is None:
            stamped = context.stamped_via = str(
                self._transactions.stamped_via(via, transaction.source)
            )
        return stamped


def _is_content_length(name: str) -> bool:
    return name.lower() in ("content-length", "l")


_COUNTER_KEYS = {code: f"responses_out.{code}" for code in (100, 180, 183, 200, 401, 403, 407)}
"""Counter names of the usual answers, built once."""
_ANSWER_KEYS = {
    (method, code): f"answered.{method}.{code}"
    for method in ("REGISTER", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS")
    for code in (100, 180, 183, 200, 401, 403, 407)
}
"""The same for the counters by method and code."""


def _response_bytes(
    request: Request,
    code: int,
    reason: str,
    via: str,
    to_tag: str | None,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
) -> bytes:
    """What ``make_response`` and serialising give for a request with one Via
    (its stamped text ``via``), byte for byte: Via, From, To (with
    ``;tag=to_tag`` when given), Call-ID and CSeq as received, then
    ``headers``, then Content-Length. Raises ``ValueError`` for a header
    field containing CR or LF, as building a ``Response`` does; ``headers``
    must not hold a Content-Length (it is written here)."""
    get = request.headers.get
    to = get("To")
    if to_tag is not None:
        to = f"{to};tag={to_tag}"
    lines = [
        f"SIP/2.0 {code} {reason}",
        f"Via: {via}",
        f"From: {get('From')}",
        f"To: {to}",
        f"Call-ID: {request.call_id}",
        f"CSeq: {get('CSeq')}",
    ]
    for name, value in headers:
        line = f"{name}: {value}"
        if "\r" in line or "\n" in line:
            raise ValueError(f"header field {name} contains CR or LF")
        lines.append(line)
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    data = "\r\n".join(lines).encode("utf-8")
    return data + body if body else data


def _format(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
