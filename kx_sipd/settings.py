"""The server's settings: one frozen object built by ``kx-sipd serve`` from its
command line and an optional TOML file, and handed to ``kx_sipd.app.run_server``.

Every field carries its documentation in ``metadata["doc"]``; the command's
``--help`` and the operator guide's configuration reference are generated from
it, so the three never disagree. Field names are the TOML keys (dashes or
underscores) and, with dashes, the command-line options.

This module parses and validates; it opens nothing and starts nothing.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from sansio_sip import Address, GuardConfig

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_DEMO_DB",
    "DEFAULT_REALM",
    "DEMO_PASSWORD",
    "DEMO_USERNAME",
    "ServerSettings",
    "field_doc",
    "format_address",
    "parse_address",
    "parse_port_range",
]

DEFAULT_DB = "kx.sqlite"
DEFAULT_DEMO_DB = "kx-demo.sqlite"
DEFAULT_REALM = "sip.kx21.com"
"""The guide's realm (§2: "Authentication Realm: sip.kx21.com")."""

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "demo-password"
"""Fixed and documented on purpose: the demo listens on loopback only, so a
known password lets a first-time operator point a softphone at it at once."""

LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("asyncio", "trio")
DRIVERS = ("anyio", "socket")


def parse_address(text: str, *, default_port: int | None = None) -> Address:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT`` or, when ``default_port`` is given,
    a bare ``HOST`` / ``[IPv6]`` / IPv6 literal. Raises ValueError naming the fault."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
        _check_ipv6(host, text)
    elif text.count(":") > 1:
        # A bare IPv6 literal: its colons are not a port separator.
        host, port_text = text, None
        _check_ipv6(host, text)
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: missing ':PORT'")
        return (host, default_port)
    return (host, _parse_port(port_text, text))


def format_address(address: Address) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    host, port = address
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_port_range(text: str) -> tuple[int, int]:
    """Parse ``A-B`` (inclusive, A ≤ B). Raises ValueError naming the fault."""
    first, sep, last = text.strip().partition("-")
    if not sep:
        raise ValueError(f"{text!r}: expected FIRST-LAST, e.g. 20000-20999")
    low, high = _parse_port(first, text), _parse_port(last, text)
    if low > high:
        raise ValueError(f"{text!r}: the first port is above the last")
    return (low, high)


def _parse_port(port_text: str, whole: str) -> int:
    if not port_text.isdigit():
        raise ValueError(f"{whole!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{whole!r}: port {port} is outside 1-65535")
    return port


def _check_ipv6(host: str, whole: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{whole!r}: {host!r} is not an IPv6 address") from None


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


def _tuple_of_addresses(value: Any) -> tuple[Address, ...]:
    return tuple((str(host), int(port)) for host, port in value)


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name.replace('_', '-')} must be positive, not {value}")


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ValueError(
                f"{attribute.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                f"not {value!r}"
            )

    return check


@attrs.frozen(kw_only=True)
class ServerSettings:
    """How one ``kx-sipd serve`` process runs. Built by the CLI; read by ``kx_sipd.app``."""

    listen: tuple[Address, ...] = attrs.field(
        default=(("0.0.0.0", 5060),),
        converter=_tuple_of_addresses,
        metadata=_doc(
            "SIP listening address, HOST:PORT (IPv6 as [::1]:5060); repeat for several. "
            "UDP and TCP are served on each. Default 0.0.0.0:5060 (127.0.0.1:5060 with --demo)."
        ),
    )
    db: str = attrs.field(
        default=DEFAULT_DB,
        metadata=_doc(
            "The SQLite database of accounts, routes and call records "
            f"(default ./{DEFAULT_DB}; ./{DEFAULT_DEMO_DB} with --demo; env KX_DB)."
        ),
    )
    realm: str | None = attrs.field(
        default=None,
        metadata=_doc(
            "Digest realm. A database is made for one realm (the stored HA1s depend on it): "
            "omitted, the database's realm is used (sip.kx21.com for a new database); "
            "given and different from the database's, serve stops with an error."
        ),
    )
    demo: bool = attrs.field(
        default=False,
        metadata=_doc(
            f"Demo mode: use ./{DEFAULT_DEMO_DB} (unless --db is given) with the account "
            f"'{DEMO_USERNAME}' (password '{DEMO_PASSWORD}') routed to the echo test, listen on "
            "loopback, and print the softphone settings."
        ),
    )
    backend: str = attrs.field(
        default="asyncio",
        validator=_one_of(BACKENDS),
        metadata=_doc("Event loop of the anyio driver: asyncio (uvloop when installed) or trio."),
    )
    driver: str = attrs.field(
        default="anyio",
        validator=_one_of(DRIVERS),
        metadata=_doc("anyio (production) or socket (blocking sockets and selectors)."),
    )
    log_level: str = attrs.field(
        default="info",
        validator=_one_of(LOG_LEVELS),
        metadata=_doc("Lowest level logged (JSON lines on stderr): debug, info, warning, error."),
    )
    sip_address: Address | None = attrs.field(
        default=None,
        metadata=_doc(
            "Address advertised in Via and Contact, HOST[:PORT] (the public address of a host "
            "behind 1:1 NAT). Default: the first listen address, or 127.0.0.1 (::1 for IPv6) "
            "when that is a wildcard."
        ),
    )
    relay: Address | None = attrs.field(
        default=None,
        metadata=_doc(
            "Control address HOST:PORT of a remote RTP relay (`kx-sipd relay serve`). "
            "Omitted, serve starts a local relay."
        ),
    )
    relay_shards: int | None = attrs.field(
        default=None,
        validator=_positive,
        metadata=_doc("Shard processes of the local relay (default: one per CPU)."),
    )
    rtp_range: tuple[int, int] = attrs.field(
        default=(20000, 20999),
        converter=tuple,
        metadata=_doc(
            "RTP port range FIRST-LAST of the local relay (guide §2: 20000-20999); "
            "RTP on even ports, RTCP on the next odd one."
        ),
    )
    rtp_address: str | None = attrs.field(
        default=None,
        metadata=_doc(
            "Media address written in SDP (the relay's public address); default: the "
            "advertised SIP host."
        ),
    )
    relay_secret: str | None = attrs.field(
        default=None,
        repr=False,
        metadata=_doc(
            "Shared secret of the relay control protocol. Required with --relay; for a local "
            "relay a random one is made when omitted."
        ),
    )
    media_timeout: float = attrs.field(
        default=60.0,
        validator=_positive,
        metadata=_doc("Seconds without RTP from either side after which a call is ended."),
    )
    echo_number: str = attrs.field(
        default="9196",
        metadata=_doc("Number that reaches the built-in echo test."),
    )
    max_calls: int = attrs.field(
        default=5000,
        validator=_positive,
        metadata=_doc("Concurrent calls the server accepts; beyond it, 503 with Retry-After."),
    )
    one_device_per_account: bool = attrs.field(
        default=False,
        metadata=_doc(
            "Refuse (403 Account in use by another device) an account's registration or call "
            "from a second address while another address used it within the registration "
            "interval (guide §3: one user per endpoint). Off by default: sharing is then only "
            "counted, logged and listed by `kx-sipd status`."
        ),
    )
    uniform_auth_failures: bool = attrs.field(
        default=False,
        metadata=_doc(
            "Answer unknown users and wrong passwords alike (403 Forbidden), so failures do not "
            "reveal which usernames exist (sipvicious svwar); logs and counters keep the true "
            "reason. Off by default: the guide's distinct '403 Unknown user' and '403 Bad "
            "credentials' help integrators debug."
        ),
    )
    max_message_size: int = attrs.field(
        default=65_535,
        validator=_positive,
        metadata=_doc(
            "Largest SIP message in bytes, UDP datagram or TCP message (headers and body); a "
            "larger request is answered 513 Message Too Large (over TCP the connection is "
            "closed), anything else larger is dropped."
        ),
    )
    max_headers: int = attrs.field(
        default=256,
        validator=_positive,
        metadata=_doc(
            "Header fields one request may carry; more are answered 400 Too many header fields."
        ),
    )
    max_via_depth: int = attrs.field(
        default=64,
        validator=_positive,
        metadata=_doc(
            "Via headers one request may carry; more are answered 400 Too many Via headers."
        ),
    )
    max_transactions: int = attrs.field(
        default=20_000,
        validator=_positive,
        metadata=_doc(
            "Live SIP transactions (retransmission state) the server keeps; a new request beyond "
            "it is answered 503 with Retry-After instead of growing without bound."
        ),
    )
    max_pending_lookups: int = attrs.field(
        default=5_000,
        validator=_positive,
        metadata=_doc(
            "Requests waiting for the account store; beyond it a slow store means 503 with "
            "Retry-After at once instead of a growing queue."
        ),
    )
    retry_after: int = attrs.field(
        default=5,
        validator=_positive,
        metadata=_doc("Seconds announced in Retry-After on every 503 the server answers."),
    )
    ban_failures: int = attrs.field(
        default=10,
        validator=_positive,
        metadata=_doc(
            "Failed authentications (wrong password, unknown user) from one source IP within "
            "--ban-window that ban the IP: everything it sends is then dropped for --ban-time. "
            "Bans are per source, so guessing an account's password never locks its owner out."
        ),
    )
    ban_window: float = attrs.field(
        default=60.0,
        validator=_positive,
        metadata=_doc("Seconds within which --ban-failures failures ban a source."),
    )
    ban_time: float = attrs.field(
        default=600.0,
        validator=_positive,
        metadata=_doc("Seconds a banned source stays banned."),
    )
    slow_after: int = attrs.field(
        default=5,
        validator=_positive,
        metadata=_doc(
            "Failed authentications for one username (from anywhere) within --ban-window after "
            "which that username's failure answers are delayed (0.5 s, doubling up to 8 s); "
            "successful logins are never delayed."
        ),
    )
    drop_scanners: bool = attrs.field(
        default=False,
        metadata=_doc(
            "Drop without an answer requests whose User-Agent names a known SIP scanner "
            "(friendly-scanner, sipvicious, sipcli, sipsak, ...). Off by default: sipsak is also "
            "a legitimate diagnostic tool."
        ),
    )
    metrics: Address | None = attrs.field(
        default=None,
        metadata=_doc(
            "HTTP endpoint HOST:PORT serving /metrics (Prometheus), /healthz, and, to loopback "
            "clients only, /status and /bans (what `kx-sipd status` and `kx-sipd bans` read). "
            "Omitted, the endpoint listens on 127.0.0.1:9061 (skipped with a warning when that "
            "port is taken). See docs/operations.md."
        ),
    )
    hep: Address | None = attrs.field(
        default=None,
        metadata=_doc(
            "Send a copy of every SIP message in and out to a HEP v3 collector (Homer, "
            "sngrep -L) at HOST:PORT over UDP. Off by default."
        ),
    )
    hep_agent_id: int = attrs.field(
        default=2001,
        validator=_positive,
        metadata=_doc("Capture agent ID written in every HEP packet (tells kx-sipd hosts apart)."),
    )
    store_timeout: float = attrs.field(
        default=2.0,
        validator=_positive,
        metadata=_doc("Seconds an account look-up may take before the request is answered 503."),
    )
    shutdown_grace: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata=_doc("On SIGTERM/SIGINT: seconds running calls may go on before they are ended."),
    )
    max_tcp_connections: int = attrs.field(
        default=4096,
        validator=_positive,
        metadata=_doc("Open TCP connections in total; more are refused."),
    )
    max_tcp_per_ip: int = attrs.field(
        default=64,
        validator=_positive,
        metadata=_doc("Open TCP connections from one IP address; more are refused."),
    )
    tcp_idle_timeout: float = attrs.field(
        default=3600.0,
        validator=_positive,
        metadata=_doc(
            "Seconds a TCP connection may stay silent before it is closed. Long: a softphone "
            "on TCP behind NAT is silent through a quiet call, and kx-sipd's BYE needs its "
            "connection."
        ),
    )

    @listen.validator
    def _check_listen(self, _attribute: object, value: tuple[Address, ...]) -> None:
        if not value:
            raise ValueError("at least one listen address is needed")

    @rtp_range.validator
    def _check_rtp_range(self, _attribute: object, value: tuple[int, ...]) -> None:
        if len(value) != 2 or not 0 < value[0] <= value[1] < 65536:
            raise ValueError(f"rtp-range must be FIRST-LAST within 1-65535, not {value}")
        if value[1] - value[0] < 3:
            raise ValueError("rtp-range must hold at least two RTP/RTCP port pairs")

    @echo_number.validator
    def _check_echo(self, _attribute: object, value: str) -> None:
        if not value.isdigit():
            raise ValueError(f"echo-number must be digits, not {value!r}")

    @relay_secret.validator
    def _check_relay_secret(self, _attribute: object, value: str | None) -> None:
        if self.relay is not None and not value:
            raise ValueError("--relay needs --relay-secret (the remote relay's secret)")

    @property
    def advertised_sip_address(self) -> Address:
        """Where clients and carriers reach us: ``sip_address``, else the first
        listen address with a wildcard replaced by loopback (a wildcard is never
        a valid Via or Contact). A ``sip_address`` without a port uses the listen port."""
        if self.sip_address is not None:
            return self.sip_address
        host, port = self.listen[0]
        if host == "0.0.0.0":
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return (host, port)

    def engine_limits(self) -> dict[str, Any]:
        """The ``EngineConfig`` keyword arguments these settings decide: the
        limits, the overload answer, and the brute-force guard."""
        guard = GuardConfig(
            failures=self.ban_failures,
            window=self.ban_window,
            ban_time=self.ban_time,
            user_failures=self.slow_after,
            drop_scanners=self.drop_scanners,
        )
        return {
            "max_calls": self.max_calls,
            "uniform_auth_failures": self.uniform_auth_failures,
            "one_device_per_account": self.one_device_per_account,
            # The names a Route or Request-URI may use for this server (§16.4).
            "local_names": tuple(sorted({host for host, _ in self.listen} - {"0.0.0.0", "::"})),
            "max_message_size": self.max_message_size,
            "max_headers": self.max_headers,
            "max_via_depth": self.max_via_depth,
            "max_transactions": self.max_transactions,
            "max_pending_lookups": self.max_pending_lookups,
            "retry_after": self.retry_after,
            "guard": guard,
        }

    @property
    def advertised_rtp_address(self) -> str:
        """The media address for SDP: ``rtp_address``, else the advertised SIP host."""
        if self.rtp_address is not None:
            return self.rtp_address
        return self.advertised_sip_address[0]


def field_doc(name: str) -> str:
    """The documentation of one ServerSettings field (for --help and the guide)."""
    field = attrs.fields_dict(ServerSettings)[name]
    return str(field.metadata["doc"])
