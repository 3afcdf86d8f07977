"""Authenticated call rate of ``kx-sipd serve``, beside the sippy B2BUA in the same run.

SIPp plays 1000 softphones (the anchors' ``sipp/users.csv``), each call an
INVITE → 401 → INVITE with digest → 100/180/200 → ACK, held ``--hold`` seconds
(default 10), then BYE (``sipp/uac_call_auth.xml``); kx-sipd hands it to a
SIPp UAS playing the carrier (``sipp/uas.xml``), relaying the SDP through its
RTP relay (no RTP flows: SIPp sends none, the relay allocates and frees ports).
The call rate steps up, each step offered for ``--secs`` seconds (default 30,
so a 10 s call at R calls/s keeps about 10*R calls up at once). A step is
*held* when no call failed or was left unfinished and the achieved rate was at
least 98 % of the target; retransmissions are reported, not disqualifying.
Each step waits for a quiet machine (at most 15 % busy over a second, up to
30 s), and a SUT that drops out has its processes stopped at once, so neither
a previous step's wake nor a collapsed reference runs on the CPUs the next
step needs. Printed: the highest rate held (every lower step held too), the peak
concurrent calls SIPp saw, the server's on-CPU time per call (its process
tree, relay shards included; per-thread schedstat via the anchors'
``anchorlib``).

When the anchors' venv has sippy (``/tmp/anchorvenv``, made by the anchors'
setup.sh, or ``$ANCHOR_VENV``), sippy's B2BUA with digest auth
(``sippy/run_b2bua.sh auth``, on 127.0.0.1:5070 → carrier 127.0.0.1:5080, as
the anchors run it) takes the same steps, interleaved with kx-sipd's, and the
ratios are printed. Both SUTs get the same SIPp command lines.

Run: python3 bench/calls.py [--rates 50,100,150,200,250] [--secs 30] [--hold 10]
     [--no-sippy] [--rtp-range 20000-29999] [--log-level warning]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from register import (  # the shared SIPp step machinery
    ANCHOR_CARRIER_PORT,
    ANCHORS,
    HEADER,
    HOST,
    KAMAILIO_PORT,
    anchorlib,
    answers_options,
    free_port,
    held,
    kx_server,
    load_note,
    make_kx_database,
    rtp_range_free,
    run_step,
    settle_kx,
    show,
    summary,
    udp_port_free,
    warm_up,
)

DIALED = "17752180264"


class MainAndTreeCPU(anchorlib.TreeCPU):
    """The tree's CPU for ``run_step``, and the main process's alone on the side: the
    engine runs on one core there, the relay shards beside it, so what limits the
    call rate is the main process's share (``main_ms_per_call`` after a step)."""

    def __init__(self, root: int) -> None:
        super().__init__(root)
        self.main_snaps: list[float] = []
        self.kernel_snaps: list[float] = []

    def snap(self) -> float:
        self.main_snaps.append(anchorlib.proc_cpu_s(self.root))
        self.kernel_snaps.append(_kernel_seconds(self.root))
        return float(super().snap())

    def main_seconds_since(self, index: int) -> float:
        return self.main_snaps[-1] - self.main_snaps[index]

    def kernel_seconds_since(self, index: int) -> float:
        return self.kernel_snaps[-1] - self.kernel_snaps[index]


def _kernel_seconds(pid: int) -> float:
    """System time of ``pid`` (all its threads), from /proc/PID/stat (clock ticks)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return int(fields[12]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


SIPPY_PORT = KAMAILIO_PORT  # run_b2bua.sh listens where the Kamailio anchor does


@contextlib.contextmanager
def carrier_uas(directory: Path, port: int, total_s: float, name: str) -> Iterator[Any]:
    """The anchors' SIPp carrier (100, 180, 200, ACK, BYE → 200) on ``port``."""
    command = [
        "sipp", "-sf", str(ANCHORS / "sipp" / "uas.xml"),
        "-i", HOST, "-p", str(port), "-nostdin", "-buff_size", "4194304",
        "-timeout", f"{int(total_s)}s",
        "-max_recv_loops", "100000", "-max_sched_loops", "100000",
    ]  # fmt: skip
    log = (directory / f"uas_{name}.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    try:
        time.sleep(0.5)
        yield process
    finally:
        anchorlib.stop(process)
        log.close()


@contextlib.contextmanager
def sippy_b2bua(directory: Path) -> Iterator[subprocess.Popen[bytes] | None]:
    venv = Path(os.environ.get("ANCHOR_VENV", "/tmp/anchorvenv"))
    python = venv / "bin" / "python"
    if (
        not python.exists()
        or subprocess.run(
            [str(python), "-c", "import sippy"], capture_output=True, check=False
        ).returncode
    ):
        print(f"sippy: not in {venv} (run the anchors' setup.sh); kx-sipd alone.")
        yield None
        return
    if not (udp_port_free(SIPPY_PORT) and udp_port_free(ANCHOR_CARRIER_PORT)):
        print(f"sippy: udp {SIPPY_PORT} or {ANCHOR_CARRIER_PORT} is taken; kx-sipd alone.")
        yield None
        return
    log = (directory / "sippy.log").open("wb")
    process = subprocess.Popen(
        ["bash", str(ANCHORS / "sippy" / "run_b2bua.sh"), "auth"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=directory,
        start_new_session=True,  # run_b2bua.sh execs python; stop its own group only
    )
    try:
        if not answers_options(SIPPY_PORT, wait=20):
            print("sippy: did not answer OPTIONS; kx-sipd alone.")
            yield None
            return
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        log.close()


def _busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def wait_quiet(limit_s: float = 30.0, busy: float = 0.15) -> None:
    """Before a step: wait (up to ``limit_s``) until the machine was at most ``busy``
    busy over a second, so a step does not start in the previous one's wake (its
    SUT's transactions still timing out, SIPp still exiting); say when it never was."""
    deadline = time.monotonic() + limit_s
    while True:
        before = _busy_jiffies()
        time.sleep(1.0)
        after = _busy_jiffies()
        share = (after[0] - before[0]) / max(1, after[1] - before[1])
        if share <= busy:
            return
        if time.monotonic() >= deadline:
            print(f"{'':>9} (the machine stayed {100 * share:.0f} % busy before this step)")
            return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="50,100,150,200,250")
    parser.add_argument("--secs", type=float, default=30.0, help="seconds each step is offered")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds each call lasts")
    parser.add_argument("--no-sippy", action="store_true")
    parser.add_argument("--rtp-range", default="20000-29999")
    parser.add_argument("--relay-shards", type=int, default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",")]
    if shutil.which("sipp") is None:
        print("sipp is not installed (apt-get install sip-tester)")
        return 2
    low, high = (int(port) for port in args.rtp_range.split("-"))
    taken = [port for port in range(low, high + 1) if not rtp_range_free(port, port)]
    if taken:
        # The relay skips ports another process holds (rtp_relay/_shard.py).
        print(f"RTP range {low}-{high}: {len(taken)} port(s) held by others {taken[:5]}")
    directory = Path(tempfile.mkdtemp(prefix="kx-bench-calls-"))
    print(f"kx-sipd call bench; {load_note()}; run directory {directory}")
    total_s = len(rates) * 2 * (args.secs * 2 + args.hold + 60) + 120
    carrier_port = free_port()
    db = make_kx_database(directory, carrier_port)
    extra: tuple[str, ...] = ("--max-calls", "20000")
    if args.relay_shards:
        extra += ("--relay-shards", str(args.relay_shards))
    steps: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        kx, kx_port = stack.enter_context(
            kx_server(directory, db, log_level=args.log_level, rtp_range=(low, high), extra=extra)
        )
        kx_uas = stack.enter_context(carrier_uas(directory, carrier_port, total_s, "kx"))
        servers: dict[str, tuple[int, Any, Any]] = {
            "kx-sipd": (kx_port, MainAndTreeCPU(kx.pid), anchorlib.TreeCPU(kx_uas.pid))
        }
        # Each SUT's processes, stopped as soon as it drops out: a collapsed SUT goes
        # on retransmitting and timing out for a while, on the CPUs the other's
        # next steps need.
        own: dict[str, contextlib.ExitStack] = {}
        if not args.no_sippy:
            own["sippy"] = stack.enter_context(contextlib.ExitStack())
            sippy = own["sippy"].enter_context(sippy_b2bua(directory))
            if sippy is not None:
                sippy_uas = own["sippy"].enter_context(
                    carrier_uas(directory, ANCHOR_CARRIER_PORT, total_s, "sippy")
                )
                servers["sippy"] = (
                    SIPPY_PORT,
                    anchorlib.TreeCPU(sippy.pid),
                    anchorlib.TreeCPU(sippy_uas.pid),
                )
        # sippy has no registrar (it answers REGISTER with an error): only kx-sipd
        # has account data to read once.
        warm_up(kx_port, directory, "kx-sipd")
        settle_kx(directory / "kx-sipd.log", started)
        time.sleep(1.0)
        print(HEADER)
        active = list(servers)
        for rate in rates:
            for label in list(active):
                port, cpu, uas_cpu = servers[label]
                wait_quiet()
                first_snap = len(getattr(cpu, "main_snaps", ()))
                step = run_step(
                    label=label,
                    sut_port=port,
                    sut_cpu=cpu,
                    uas_cpu=uas_cpu,
                    scenario="uac_call_auth.xml",
                    rate=rate,
                    secs=args.secs,
                    directory=directory,
                    tail_s=args.hold,
                    extra=(
                        "-s", DIALED, "-d", str(int(args.hold * 1000)),
                        # As the anchors ran: a late 180 after the 200 is not a failure.
                        "-default_behaviors", "all,-abortunexp",
                    ),
                )  # fmt: skip
                steps.append(step)
                ok = held(step, strict_retrans=False)
                show(step, ok)
                if isinstance(cpu, MainAndTreeCPU) and step["ok"]:
                    main_s = cpu.main_seconds_since(first_snap)
                    kernel_s = cpu.kernel_seconds_since(first_snap)
                    print(
                        f"{'':>9} main process alone: {1000.0 * main_s / step['ok']:.3f} ms "
                        f"CPU per call ({100.0 * kernel_s / max(main_s, 1e-9):.0f} % of it in "
                        f"the kernel), {100.0 * main_s / step['wall_s']:.0f} % of a CPU; "
                        f"{load_note()}",
                        flush=True,
                    )
                if not ok:
                    active.remove(label)
                    if label in own:
                        own[label].close()
                time.sleep(3.0)
            if not active:
                break
    print()
    summary(steps, list(servers), unit="calls/s", target=200.0, strict_retrans=False)
    print(f"after the run: {load_note()}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
