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
from ._headers import Via
from ._message import Request, make_response
from ._seams import Entropy
from ._transaction import ServerTransaction, TransactionLayer

__all__ = ["Responder", "ServerContext", "context_of"]


@attrs.define(slots=True, eq=False)
class ServerContext:
    to_tag: str | None = None
    final: bool = False
    account: str | None = None  # the username of its credentials, once seen
    stamped_via: Via | None = None  # the top Via with received/rport, once computed
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
        if code != 100 and request.to.tag is None:
            tag = to_tag or context.to_tag or self._entropy(6).hex()
            context.to_tag = tag
        if code >= 200:
            context.final = True
            headers = (*headers, ("Server", self._server_name))
        response = make_response(request, code, reason, to_tag=tag, headers=headers, body=body)
        # §18.2.1 / RFC 3581 §4: received and rport belong in the answer's copy
        # of the top Via; the request itself is left as received (its parsed
        # headers stay cached).
        vias = request.vias
        if len(vias) == 1:
            # The usual shape (one Via from a client): stamp the request's
            # already-parsed Via instead of re-parsing the answer's copy.
            response.headers.set("Via", str(self._stamped(vias[0], transaction)))
        else:
            self._transactions.stamp_via(response, transaction.source)
        self._counters[f"responses_out.{code}"] += 1
        items: list[object] = list(self._transactions.respond(transaction, response, now=now))
        if code >= 200:
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

    def _stamped(self, via: Via, transaction: ServerTransaction) -> Via:
        """The stamped top Via, computed once per transaction (a 100 Trying,
        the final answer and its retransmissions carry the same one)."""
        context = context_of(transaction)
        stamped = context.stamped_via
        if stamped is None:
            stamped = context.stamped_via = self._transactions.stamped_via(via, transaction.source)
        return stamped


def _format(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
