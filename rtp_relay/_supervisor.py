"""The supervisor: lifecycle of the shard processes, nothing else.

It starts one process per shard with the ``spawn`` method and the pickled
frozen ``RelayConfig``, shares one shutdown event with them, handles SIGINT
and SIGTERM itself, and restarts a shard that dies. It never touches a media
or control socket: each shard binds its own.

Restarting means starting a Python interpreter and importing the relay,
which takes most of a second on a busy 2-CPU host; so one extra process is
kept as a warm spare, imports done and nothing bound, and a dead shard's
slice is handed to it (a pipe message), which takes milliseconds. A new
spare is then started in the background.

A restarted shard starts empty (its calls' sockets died with it) and gets a
fresh random *incarnation* number; every control reply carries it, so a
client that allocated on the previous incarnation knows those calls are lost
(``RelayClient.expired`` reports them as "relay-lost"). Restarts are
immediate; a shard that keeps dying (``CRASH_LOOP`` deaths within
``CRASH_WINDOW`` seconds) is restarted once a second rather than in a tight
loop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import time
from typing import Any

import attrs

from ._config import RelayConfig
from ._log import event, setup_logging
from ._shard import shard_main

__all__ = ["RelayStartError", "pick_control_port", "run_supervisor"]

START_TIMEOUT = 20.0
STOP_GRACE = 3.0
CRASH_LOOP = 5
CRASH_WINDOW = 10.0


class RelayStartError(Exception):
    """The relay could not start (a control port taken, a shard failing to start)."""


def pick_control_port(host: str, shards: int, *, attempts: int = 50) -> int:
    """A port P such that P (shared control) and P+1 … P+shards (shard control
    ports) are all free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        probes: list[socket.socket] = []
        try:
            first = socket.socket(family, socket.SOCK_DGRAM)
            probes.append(first)
            first.bind((host, 0))
            base = int(first.getsockname()[1])
            if base + shards > 65535:
                continue
            for offset in range(1, shards + 1):
                probe = socket.socket(family, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind((host, base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RelayStartError(f"no block of {shards + 1} free UDP ports on {host}")


def _incarnation() -> int:
    return int.from_bytes(os.urandom(6), "big")


class Supervisor:
    """Starts, watches and restarts the shards of one relay."""

    def __init__(self, config: RelayConfig, *, parent_pid: int | None = None) -> None:
        self.config = config
        self.parent_pid = parent_pid
        self.context = multiprocessing.get_context("spawn")
        self.shutdown = self.context.Event()
        self.reports: Any = self.context.Queue()
        self.processes: dict[int, Any] = {}
        self.incarnations: dict[int, int] = {}
        self.restarts: dict[int, int] = {}
        self.deaths: dict[int, list[float]] = {}
        self.pending: dict[int, float] = {}
        self.spare: tuple[Any, Any] | None = None
        self.stopping = False

    def _spawn(self, index: int, *, spare: bool = False) -> Any:
        incarnation = _incarnation()
        receiver = None
        if spare:
            receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=shard_main,
            args=(
                self.config,
                index,
                incarnation,
                self.restarts.get(index, 0),
                self.shutdown,
                self.reports,
                os.getpid(),
                receiver,
            ),
            name="kx-relay-spare" if spare else f"kx-relay-shard-{index}",
            daemon=True,
        )
        process.start()
        if spare:
            receiver.close()  # type: ignore[union-attr]  # the child holds its own copy
            self.spare = (process, sender)
        else:
            self.processes[index] = process
            self.incarnations[index] = incarnation
        return process

    def _restart(self, index: int) -> None:
        """Give the dead shard's slice to the warm spare (or a new process), then
        start the next spare."""
        self.restarts[index] = self.restarts.get(index, 0) + 1
        spare = self.spare
        self.spare = None
        if spare is not None and spare[0].is_alive():
            process, sender = spare
            incarnation = _incarnation()
            try:
                sender.send((index, incarnation, self.restarts[index]))
            except OSError:
                process.kill()
            else:
                self.processes[index] = process
                self.incarnations[index] = incarnation
                sender.close()
                self._spawn(-1, spare=True)
                return
        self._spawn(index)
        self._spawn(-1, spare=True)

    def start(self) -> None:
        """Start every shard and wait until each has bound its control ports."""
        count = self.config.shard_count
        for index in range(count):
            self._spawn(index)
        waiting = set(range(count))
        deadline = time.monotonic() + START_TIMEOUT
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RelayStartError(f"shards {sorted(waiting)} did not start in time")
            try:
                kind, index, _incarnation, detail = self.reports.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                for index in waiting:
                    if not self.processes[index].is_alive():
                        raise RelayStartError(f"shard {index} exited while starting") from None
                continue
            if kind == "error":
                raise RelayStartError(f"shard {index}: {detail}")
            waiting.discard(index)
        self._spawn(-1, spare=True)

    def _drain_reports(self) -> None:
        while True:
            try:
                kind, index, incarnation, detail = self.reports.get_nowait()
            except queue.Empty:
                return
            level = logging.INFO if kind == "ready" else logging.ERROR
            event(level, f"relay.shard_{kind}", shard=index, incarnation=incarnation, detail=detail)

    def _on_death(self, index: int, now: float) -> None:
        process = self.processes[index]
        process.join(0)
        deaths = [t for t in self.deaths.get(index, []) if now - t < CRASH_WINDOW] + [now]
        self.deaths[index] = deaths
        delay = 1.0 if len(deaths) >= CRASH_LOOP else 0.0
        event(
            logging.ERROR,
            "relay.shard_died",
            shard=index,
            exitcode=process.exitcode,
            incarnation=self.incarnations[index],
            restart_in=delay,
        )
        self.pending[index] = now + delay

    def watch(self) -> None:
        """Restart dead shards until asked to stop (signal, or the parent gone)."""
        while not self.stopping:
            sentinels = {
                self.processes[i].sentinel: i for i in self.processes if i not in self.pending
            }
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.2)
            now = time.monotonic()
            if self.stopping:
                break
            for sentinel in ready:
                self._on_death(sentinels[sentinel], now)
            for index, when in list(self.pending.items()):
                if when <= now:
                    del self.pending[index]
                    self._restart(index)
            self._drain_reports()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                event(logging.WARNING, "relay.parent_gone")
                break

    def stop(self) -> None:
        """Tell every shard to stop, wait briefly, then end stragglers."""
        self.stopping = True
        self.shutdown.set()
        processes = list(self.processes.values())
        if self.spare is not None:
            processes.append(self.spare[0])
        deadline = time.monotonic() + STOP_GRACE
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(1.0)
        with contextlib.suppress(Exception):
            self.reports.close()


def run_supervisor(config: RelayConfig, *, ready: Any = None, parent_pid: int | None = None) -> int:
    """Run a relay in this process until SIGINT/SIGTERM (or ``parent_pid`` exits).

    When the control port is 0, a free block of ports is chosen first. On
    start-up, sends ("ready", control address, shard count) or ("error",
    message) on the ``ready`` connection when one is given. Returns the exit
    status (0 after a clean stop, 1 when the relay could not start).
    """
    setup_logging(config.log_level)
    if config.control[1] == 0:
        try:
            port = pick_control_port(config.control[0], config.shard_count)
        except RelayStartError as exc:
            if ready is not None:
                ready.send(("error", str(exc)))
            return 1
        config = attrs.evolve(config, control=(config.control[0], port))
    supervisor = Supervisor(config, parent_pid=parent_pid)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        supervisor.start()
    except RelayStartError as exc:
        event(logging.ERROR, "relay.start_failed", error=str(exc))
        supervisor.stop()
        if ready is not None:
            ready.send(("error", str(exc)))
        return 1
    event(
        logging.INFO,
        "relay.started",
        control=list(config.control),
        shards=config.shard_count,
        rtp_range=list(config.rtp_range),
        advertised=config.advertised,
    )
    if ready is not None:
        ready.send(("ready", config.control, config.shard_count))
    try:
        supervisor.watch()
    finally:
        supervisor.stop()
        event(logging.INFO, "relay.stopped")
    return 0
