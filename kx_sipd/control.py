"""The HTTP control endpoint of ``kx-sipd serve``: /metrics, /healthz, /status, /bans.

How it runs: a small ``http.server`` in a thread of its own, for either driver.
The engine is not thread-safe, so everything that reads or changes it (the
figures of a snapshot, lifting a ban) is handed to the driver's loop with
``Server.call_in_loop`` and waited for under a deadline; the blocking questions
(the store probe, the relay's shard figures) stay in this thread, off the loop.
One implementation serves both drivers, and a stuck loop shows as a 503 of
/healthz instead of a hung endpoint. At most ``MAX_REQUESTS`` requests are
handled at once (more are closed at once, counted), each socket has a timeout,
and the default address is loopback.

Routes:

* ``GET /metrics``: Prometheus text format (kx_sipd/metrics.py).
* ``GET /healthz``: 200 when the SIP port, the store and the relay are all up,
  503 otherwise; the JSON body names each component and what is down.
* ``GET /status``: what ``kx-sipd status`` prints (JSON).
* ``GET /bans``, ``POST /bans/clear`` (JSON body ``{"ip": "..."}`` or none for all):
  what ``kx-sipd bans list|clear`` use.

``/status`` and ``/bans`` answer only clients on a loopback address (403
otherwise), whatever address the endpoint listens on: they name callers' IPs
and accounts, and clearing bans changes the server. /metrics and /healthz are
for the monitoring system; bind the endpoint where only it can reach them.

The client side (``control_request``) is what the CLI commands use.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from sansio_sip import Address

from .metrics import ServerMetrics, Snapshot, take_snapshot

__all__ = [
    "DEFAULT_CONTROL",
    "MAX_REQUESTS",
    "ControlEndpoint",
    "ControlError",
    "control_request",
]

DEFAULT_CONTROL: Address = ("127.0.0.1", 9061)
"""Where the endpoint listens when ``--metrics`` is not given (and where the CLI looks)."""

MAX_REQUESTS = 16
LOOP_TIMEOUT = 1.0  # a healthy loop answers in well under a millisecond
PROBE_MAX_AGE = 1.0  # one store probe per second at most, however often /healthz is asked
STORE_PROBE_USER = "\x00kx-health-probe"  # no account can have this name
# The classic text format generate_latest writes for our (legacy-charset) names; newer
# prometheus-client releases announce version=1.0.0, which Prometheus 2.x does not know.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SOCKET_TIMEOUT = 5.0
_MAX_BODY = 4096


class ControlError(Exception):
    """The control endpoint could not be reached or answered an error (for the CLI)."""


class _Probe:
    """A blocking check, run at most once per ``max_age`` and by one thread at a time."""

    def __init__(self, check: Callable[[], object], max_age: float) -> None:
        self._check = check
        self._max_age = max_age
        self._lock = threading.Lock()
        self._last: tuple[float, dict[str, Any]] | None = None

    def result(self) -> dict[str, Any]:
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self._max_age:
                return self._last[1]
            start = time.perf_counter()
            try:
                self._check()
            except Exception as exc:
                verdict: dict[str, Any] = {"up": False, "error": str(exc) or repr(exc)}
            else:
                verdict = {"up": True}
            verdict["latency_ms"] = round((time.perf_counter() - start) * 1000, 3)
            self._last = (time.monotonic(), verdict)
            return verdict


class ControlEndpoint:
    """Serves the routes above for one server (see the module docstring).

    ``store_check`` raises when the store is down (a cheap look-up); ``info`` goes into
    /status as is. The driver is attached once it listens (``attach``)."""

    def __init__(
        self,
        address: Address,
        *,
        metrics: ServerMetrics,
        store_check: Callable[[], object],
        info: dict[str, Any],
        log: Callable[..., None] | None = None,
    ) -> None:
        self.requested = address
        self.metrics = metrics
        self._store = _Probe(store_check, PROBE_MAX_AGE)
        self._info = info
        self._log = log
        self._engine: Any = None
        self._server: Any = None
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.counters: Counter[str] = Counter()
        metrics.attach(snapshot=self.snapshot, health=self._health_flags)

    @property
    def address(self) -> Address:
        """The bound address (after ``start``)."""
        if self._http is None:
            return self.requested
        host, port = self._http.server_address[:2]
        return (str(host), int(port))

    def attach(self, *, engine: Any, server: Any) -> None:
        """The engine and the driver's ``Server`` (which has ``call_in_loop``)."""
        self._engine, self._server = engine, server

    def start(self) -> Address:
        """Bind and serve in a daemon thread. Raises OSError when the address is taken."""
        host, port = self.requested
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        endpoint = self
        server_class = type(
            "_ControlHTTPServer",
            (_BoundedHTTPServer,),
            {"address_family": family, "endpoint": endpoint},
        )
        self._http = server_class((host, port), _Handler)
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.name = "kx-sipd-control"
        self._thread.start()
        return self.address

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread is not None:
            self._thread.join(5.0)

    # -- what the routes compute -------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The loop's figures. Raises TimeoutError (loop stuck), RuntimeError (not serving)."""
        engine, server = self._engine, self._server
        if engine is None or server is None:
            raise RuntimeError("the SIP driver is not serving yet")
        snapshot: Snapshot = server.call_in_loop(
            lambda: take_snapshot(engine, server), timeout=LOOP_TIMEOUT
        )
        return snapshot

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(all up, body): each component's verdict and the list of those down."""
        body: dict[str, Any] = {}
        try:
            snapshot = self.snapshot()
        except (TimeoutError, RuntimeError) as exc:
            body["sip"] = {"up": False, "error": str(exc)}
        else:
            body["sip"] = {
                "up": bool(snapshot.addresses) and snapshot.accepting,
                "listen": [_format(address) for address in snapshot.addresses],
            }
            if not snapshot.addresses:
                body["sip"]["error"] = "no SIP socket is bound"
            elif not snapshot.accepting:
                # A load balancer must stop sending calls here: they would get 503.
                body["sip"]["error"] = "stopping: new calls are refused while calls up end"
        body["store"] = self._store.result()
        sample = self.metrics.relay_sample()
        if sample is None:
            body["relay"] = {"up": False, "error": "no relay configured"}
        else:
            body["relay"] = {"up": sample.up, "shards_up": sum(1 for s in sample.shards if s["up"])}
            if sample.error:
                body["relay"]["error"] = sample.error
        down = [name for name in ("sip", "store", "relay") if not body[name]["up"]]
        body["status"] = "down" if down else "ok"
        body["down"] = down
        return not down, body

    def _health_flags(self) -> dict[str, bool]:
        _ok, body = self.health()
        return {name: bool(body[name]["up"]) for name in ("sip", "store", "relay")}

    def status(self) -> dict[str, Any]:
        """Everything ``kx-sipd status`` shows."""
        metrics = self.metrics
        _ok, health = self.health()
        out: dict[str, Any] = {
            "server": {
                **self._info,
                "pid": os.getpid(),
                "started": _iso(metrics.started_wall),
                "uptime_s": round(metrics.uptime, 3),
            },
            "health": health,
        }
        try:
            snapshot = self.snapshot()
        except (TimeoutError, RuntimeError) as exc:
            out["error"] = str(exc)
            snapshot = None
        routes = metrics.routes()
        out["routes"] = {
            name: {
                "up": figures.up,
                "attempts": figures.attempts,
                "answers": figures.answers,
                "failures": {str(code): n for code, n in sorted(figures.failures.items())},
            }
            for name, figures in routes.items()
        }
        if snapshot is not None:
            stats = snapshot.engine
            out["calls"] = {
                "up": snapshot.active_calls,
                "started": stats.get("calls.started", 0),
                "answered": stats.get("calls.answered", 0),
                "rejected": _prefixed(stats, "calls.rejected."),
                "ended": _prefixed(stats, "calls.ended."),
            }
            out["sip"] = {
                "requests": _prefixed(stats, "requests_in."),
                "responses": _prefixed(stats, "responses_out."),
                "auth": {
                    key: value
                    for key, value in _prefixed(stats, "auth.").items()
                    if key != "challenged"
                },
                "transactions": stats.get("transactions", 0),
                "tcp_connections": snapshot.driver.get("tcp_connections", 0),
            }
            out["dropped"] = {
                key.removeprefix("dropped_"): value
                for key, value in sorted(stats.items())
                if key.startswith("dropped_")
            }
            out["bans"] = _bans(snapshot)
            out["shared_accounts"] = [
                {"account": account, "addresses": list(addresses)}
                for account, addresses in snapshot.shared
            ]
            out["devices"] = {
                # Since start: requests let through from an account's additional address,
                # and those refused by --one-device-per-account (a refused device never
                # shows in shared_accounts: it is not remembered as one of the account's).
                "sharing_seen": stats.get("accounts_shared", 0),
                "second_refused": stats.get("refused_second_device", 0),
            }
        sample = metrics.relay_sample()
        if sample is not None:
            out["relay"] = {"up": sample.up, "error": sample.error, "shards": list(sample.shards)}
        return out

    def clear_bans(self, ip: str | None) -> int:
        engine, server = self._engine, self._server
        if engine is None or server is None:
            raise RuntimeError("the SIP driver is not serving yet")
        cleared: int = server.call_in_loop(lambda: engine.clear_bans(ip), timeout=LOOP_TIMEOUT)
        if self._log is not None:
            self._log("info", "bans.cleared", ip=ip, count=cleared)
        return cleared


class _BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    endpoint: ControlEndpoint
    _slots = threading.BoundedSemaphore(MAX_REQUESTS)

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.endpoint.counters["refused_busy"] += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _BoundedHTTPServer
    timeout = _SOCKET_TIMEOUT
    protocol_version = "HTTP/1.0"
    server_version = "kx-sipd"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        endpoint = self.server.endpoint
        if endpoint._log is not None:
            endpoint._log(
                "debug", "control.request", peer=self.client_address[0], line=format % args
            )

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        endpoint = self.server.endpoint
        endpoint.counters["requests"] += 1
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path == "/metrics" and method == "GET":
                self._reply(200, endpoint.metrics.render(), METRICS_CONTENT_TYPE)
            elif path == "/healthz" and method == "GET":
                ok, body = endpoint.health()
                self._json(200 if ok else 503, body)
            elif path in ("/status", "/bans", "/bans/clear"):
                self._control(endpoint, method, path)
            elif path in ("/metrics", "/healthz"):
                self._json(405, {"error": "method not allowed"})
            else:
                self._json(404, {"error": f"no route {path}"})
        except (TimeoutError, RuntimeError) as exc:
            self._json(503, {"error": str(exc)})
        except OSError:
            endpoint.counters["client_gone"] += 1  # the client went away mid-answer

    def _control(self, endpoint: ControlEndpoint, method: str, path: str) -> None:
        if not _loopback(self.client_address[0]):
            endpoint.counters["refused_remote"] += 1
            self._json(403, {"error": "control routes answer loopback clients only"})
            return
        if path == "/status" and method == "GET":
            self._json(200, endpoint.status())
        elif path == "/bans" and method == "GET":
            self._json(200, {"bans": _bans(endpoint.snapshot())})
        elif path == "/bans/clear" and method == "POST":
            ok, ip = self._ip_argument()
            if ok:
                self._json(200, {"cleared": endpoint.clear_bans(ip), "ip": ip})
        else:
            self._json(405, {"error": "method not allowed"})

    def _ip_argument(self) -> tuple[bool, str | None]:
        """(True, the ``ip`` of a clear request, None for all); (False, None) after a 400."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self._json(400, {"error": "bad Content-Length"})
            return False, None
        raw = self.rfile.read(length) if length else b""
        try:
            body = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            self._json(400, {"error": "the body is not JSON"})
            return False, None
        ip = body.get("ip") if isinstance(body, dict) else None
        if ip is None:
            return True, None
        try:
            return True, str(ipaddress.ip_address(str(ip)))
        except ValueError:
            self._json(400, {"error": f"{ip!r} is not an IP address"})
            return False, None

    def _json(self, status: int, body: Any) -> None:
        self._reply(status, orjson.dumps(body, option=orjson.OPT_INDENT_2), "application/json")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _bans(snapshot: Snapshot) -> list[dict[str, Any]]:
    return [{"ip": ip, "seconds_left": round(left, 1)} for ip, left in snapshot.bans]


def _prefixed(stats: dict[str, int], prefix: str) -> dict[str, int]:
    return {
        key.removeprefix(prefix): value
        for key, value in sorted(stats.items())
        if key.startswith(prefix)
    }


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _format(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def control_request(
    address: Address,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """Ask a running server's control endpoint; (HTTP status, decoded JSON body).
    Raises ControlError when it cannot be reached or does not answer JSON."""
    host, port = address
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    payload = orjson.dumps(body) if body is not None else None
    try:
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        raise ControlError(
            f"no kx-sipd control endpoint at {_format(address)} ({exc}); is the server running, "
            "and with which --metrics address?"
        ) from None
    finally:
        connection.close()
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ControlError(
            f"{_format(address)}{path} answered {status} without JSON: is it kx-sipd?"
        ) from None
