"""Authenticated REGISTER throughput of ``kx-sipd serve``, beside Kamailio in the same run.

SIPp plays 1000 softphones (the anchors' ``sipp/users.csv``) doing REGISTER →
401 → REGISTER with digest → 200 (``sipp/reg_auth.xml``: one registration is
two SIP transactions, four messages; issue #3's target of 3,000 authenticated
REGISTER transactions/s is therefore 1,500 registrations/s, and both figures
are printed). The rate steps up (default 500, 1000,
2000, 3000, 4000 registrations/s, 10 s each, bounded by ``-m``); a step is
*held* when every registration succeeded, none was retransmitted, and the
achieved rate was at least 98 % of the target. The figure is the highest step
held with every lower step held too, and the on-CPU time per registration of
the server's process tree (per-thread schedstat, the anchors' ``anchorlib``).

When Kamailio is installed (``apt-get install kamailio``), the anchors'
digest-auth configuration runs the same steps, interleaved with kx-sipd's
(kx-sipd at rate R, then Kamailio at R), so both see the same machine; the
ratios printed are the comparable figures. Kamailio listens on 127.0.0.1:5070
(its configuration says so); kx-sipd on a free port.

The anchors (../shared/anchors, next to this repository) are used where they
are at run time: their scenarios, users and Kamailio configuration, and
``anchorlib`` for CPU accounting and SIPp statistics. Only loopback is used.

Run: python3 bench/register.py [--rates 500,1000,2000,3000,4000] [--secs 10]
     [--no-kamailio] [--log-level warning]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ANCHORS = REPO.parent / "shared" / "anchors"
sys.path.insert(0, str(ANCHORS))
sys.path.insert(0, str(REPO))

import anchorlib  # noqa: E402  (the anchors' CPU accounting, read where it lives)

HOST = "127.0.0.1"
KAMAILIO_PORT = 5070  # fixed in the anchors' kamailio.cfg
ANCHOR_CARRIER_PORT = 5080  # fixed in kamailio.cfg and sippy/run_b2bua.sh
USERS_CSV = ANCHORS / "sipp" / "users.csv"


# ------------------------------------------------------------------ ports


def free_port(*, tcp_too: bool = False) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            if not tcp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


def udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def free_rtp_block(size: int, low: int = 40000, high: int = 60000) -> tuple[int, int]:
    """``size`` consecutive free UDP ports (even start) between ``low`` and ``high``."""
    for start in range(low, high - size, 1000):
        if rtp_range_free(start, start + size - 1):
            return start, start + size - 1
    raise RuntimeError(f"no {size} free UDP ports in {low}-{high}")


def rtp_range_free(low: int, high: int) -> bool:
    """Every port of the range bindable right now (another run may hold some)."""
    probes = []
    try:
        for port in range(low, high + 1):
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            probes.append(probe)
            probe.bind(("0.0.0.0", port))
        return True
    except OSError:
        return False
    finally:
        for probe in probes:
            probe.close()


# ------------------------------------------------------------- the servers


def anchor_users() -> list[tuple[str, str]]:
    users = []
    for line in USERS_CSV.read_text().splitlines():
        fields = line.split(";")
        if len(fields) >= 2 and fields[0] != "SEQUENTIAL":
            users.append((fields[0], fields[1]))
    return users


def make_kx_database(directory: Path, carrier_port: int) -> Path:
    """The anchors' 1000 users, routed to a carrier on ``carrier_port``.

    Written through kx_sipd's Store (the CLI's code path, without a process
    start per account).
    """
    from kx_sipd.store import Store
    from sansio_sip import Route

    db = directory / "kx.sqlite"
    store = Store(db, synchronous="NORMAL")
    try:
        store.put_route(Route(name="carrier", host=HOST, port=carrier_port))
        for user, password in anchor_users():
            store.add_account(user, password, route="carrier")
    finally:
        store.close()
    return db


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("KX_DB", None)
    return env


def answers_options(port: int, wait: float = 30.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if anchorlib.sip_options_ping(HOST, port, timeout=0.5, tries=1):
            return True
    return False


@contextlib.contextmanager
def kx_server(
    directory: Path,
    db: Path,
    *,
    log_level: str,
    rtp_range: tuple[int, int],
    extra: Sequence[str] = (),
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``kx-sipd serve`` on a free port; yields (process, port); stopped after."""
    port = free_port(tcp_too=True)
    log = (directory / "kx-sipd.log").open("wb")
    command = [
        sys.executable, "-m", "kx_sipd", "serve",
        "--db", str(db),
        "--listen", f"{HOST}:{port}",
        "--rtp-range", f"{rtp_range[0]}-{rtp_range[1]}",
        "--rtp-address", HOST,
        "--log-level", log_level,
        "--shutdown-grace", "5",
        *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_environment(), cwd=directory
    )
    try:
        if not answers_options(port):
            raise RuntimeError(
                "kx-sipd did not answer OPTIONS:\n"
                + (directory / "kx-sipd.log").read_text(errors="replace")[-3000:]
            )
        yield process, port
    finally:
        anchorlib.stop(process, wait=20)
        log.close()


@contextlib.contextmanager
def kamailio_server(directory: Path) -> Iterator[subprocess.Popen[bytes] | None]:
    """The anchors' Kamailio (children=4, shm 256 MB), or None when it cannot run here."""
    binary = shutil.which("kamailio")
    if binary is None:
        print("Kamailio: not installed (apt-get install kamailio); kx-sipd alone.")
        yield None
        return
    if not udp_port_free(KAMAILIO_PORT):
        print(f"Kamailio: udp {HOST}:{KAMAILIO_PORT} is taken (another run?); kx-sipd alone.")
        yield None
        return
    db = ANCHORS / "kamailio" / "db"
    command = [
        binary, "-f", str(ANCHORS / "kamailio" / "kamailio.cfg"),
        "-DD", "-E", "-Y", str(directory), "-P", str(directory / "kam.pid"),
        "-w", str(directory), "-m", "256", "-M", "16",
        "-A", f'DBURL="text://{db}"', "-A", "CHILDREN=4",
    ]  # fmt: skip
    log = (directory / "kamailio.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    try:
        if not answers_options(KAMAILIO_PORT, wait=15):
            print("Kamailio: did not answer OPTIONS; kx-sipd alone. Log tail:")
            print((directory / "kamailio.log").read_text(errors="replace")[-1500:])
            yield None
            return
        yield process
    finally:
        anchorlib.stop(process, wait=10)
        log.close()


# ------------------------------------------------------------------ a step


def _seconds(text: str) -> float:
    """SIPp's HH:MM:SS:uuuuuu (or HH:MM:SS)."""
    parts = [int(part) for part in text.split(":")]
    hours, minutes, seconds = parts[:3]
    micros = parts[3] if len(parts) > 3 else 0
    return hours * 3600 + minutes * 60 + seconds + micros / 1e6


def sipp_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    return [dict(zip(rows[0], row, strict=False)) for row in rows[1:]]


def run_step(
    *,
    label: str,
    sut_port: int,
    sut_cpu: Any,
    scenario: str,
    rate: float,
    secs: float,
    directory: Path,
    extra: Sequence[str] = (),
    tail_s: float = 0.0,
    uas_cpu: Any = None,
) -> dict[str, Any]:
    """One SIPp UAC step at ``rate`` calls/s for ``secs`` (``-m rate*secs``)."""
    total = int(rate * secs)
    stat = directory / f"stat_{label}_{rate:g}.csv"
    timeout = int(secs * 2 + tail_s + 30)
    command = [
        "sipp", f"{HOST}:{sut_port}",
        "-sf", str(ANCHORS / "sipp" / scenario),
        "-inf", str(USERS_CSV),
        "-i", HOST, "-p", str(free_port()),
        "-r", f"{rate:g}", "-rp", "1000", "-m", str(total),
        "-l", str(max(1000, int(rate * (tail_s + 6)))),
        "-nostdin", "-buff_size", "4194304",
        "-trace_stat", "-stf", str(stat), "-fd", "1",
        "-trace_err", "-error_file", str(directory / f"err_{label}_{rate:g}.log"),
        "-timeout", f"{timeout}s", "-recv_timeout", "5000",
        "-max_recv_loops", "100000", "-max_sched_loops", "100000",
        *extra,
    ]  # fmt: skip
    machine0 = anchorlib.sys_cpu()
    drops0 = anchorlib.udp_rcvbuf_errors()
    cpu0 = sut_cpu.snap()
    uas0 = uas_cpu.snap() if uas_cpu else 0.0
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=directory
    )
    try:
        _, err = process.communicate(timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        anchorlib.stop(process)
        err = b"killed by the bench's timeout"
    wall = time.monotonic() - started
    cpu = sut_cpu.snap() - cpu0
    uas = (uas_cpu.snap() - uas0) if uas_cpu else None
    rows = sipp_rows(stat) if stat.exists() else []
    last = rows[-1] if rows else {}
    ok = int(last.get("SuccessfulCall(C)", 0) or 0)
    failed = int(last.get("FailedCall(C)", 0) or 0)
    elapsed = _seconds(last["ElapsedTime(C)"]) if last else wall
    return {
        "sut": label,
        "rate": rate,
        "ok": ok,
        "failed": failed,
        "unfinished": total - ok - failed,
        "retrans": int(last.get("Retransmissions(C)", 0) or 0),
        "achieved": ok / max(elapsed - tail_s, 1e-3),
        "rt_ms": _seconds(last.get("ResponseTime1(C)", "0:0:0:0")) * 1000 if last else 0.0,
        "peak_calls": max((int(r.get("CurrentCall", 0) or 0) for r in rows), default=0),
        "sut_cpu_pct": 100.0 * cpu / wall,
        "cpu_ms_per_call": 1000.0 * cpu / ok if ok else float("nan"),
        "uas_cpu_pct": None if uas is None else 100.0 * uas / wall,
        "machine_busy_pct": anchorlib.sys_busy_pct(machine0, anchorlib.sys_cpu()),
        "udp_drops": anchorlib.udp_rcvbuf_errors() - drops0,
        "wall_s": wall,
        "sipp_status": process.returncode,
        "sipp_error": err.decode(errors="replace")[-200:]
        if process.returncode not in (0, 1)
        else "",
    }


def warm_up(port: int, directory: Path, label: str) -> None:
    """Every anchor user registers once at a gentle rate (not measured): both
    servers start the steps with their account data read once."""
    command = [
        "sipp", f"{HOST}:{port}", "-sf", str(ANCHORS / "sipp" / "reg_auth.xml"),
        "-inf", str(USERS_CSV), "-i", HOST, "-p", str(free_port()),
        "-r", "200", "-m", str(len(anchor_users())), "-nostdin", "-timeout", "60s",
    ]  # fmt: skip
    subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=directory,
        timeout=90, check=False,
    )  # fmt: skip
    print(f"{label}: warmed up ({len(anchor_users())} registrations at 200/s, not counted)")


def settle_kx(log: Path, started: float) -> None:
    """io_anyio moves account look-ups to worker threads for a cool-down (30 s)
    after one inline look-up takes over 5 ms; a cold first look-up on a busy
    machine does. Measure the steady state: wait the cool-down out, and say so."""
    text = log.read_text(errors="replace")
    if "store.inline_suspended" not in text:
        return
    cooldown = 30.0
    for line in text.splitlines():
        if "store.inline_suspended" in line and '"cooldown_s":' in line:
            cooldown = float(line.split('"cooldown_s":', 1)[1].split("}")[0].split(",")[0])
    wait = max(0.0, started + cooldown + 2 - time.monotonic())
    count = text.count("store.inline_suspended")
    print(
        f"kx-sipd: inline account look-ups were suspended {count}x during start/warm-up "
        f"(store.inline_suspended); waiting {wait:.0f} s for the {cooldown:g} s cool-down"
    )
    time.sleep(wait)


def held(step: dict[str, Any], *, strict_retrans: bool = True) -> bool:
    """Every call succeeded (none failed or left unfinished), none retransmitted
    (when asked), and at least 98 % of the target rate was achieved."""
    return (
        step["failed"] == 0
        and step["unfinished"] == 0
        and (step["retrans"] == 0 or not strict_retrans)
        and step["achieved"] >= 0.98 * step["rate"]
    )


HEADER = (
    f"{'sut':>9} {'rate':>6} {'ok':>7} {'fail':>5} {'unfin':>5} {'retx':>5} {'achieved':>8} "
    f"{'rt_ms':>6} {'peak':>5} {'sut%':>6} {'ms/call':>7} {'mach%':>5} {'drops':>6} held"
)


def show(step: dict[str, Any], ok: bool) -> None:
    print(
        f"{step['sut']:>9} {step['rate']:>6g} {step['ok']:>7} {step['failed']:>5} "
        f"{step['unfinished']:>5} {step['retrans']:>5} {step['achieved']:>8.1f} "
        f"{step['rt_ms']:>6.1f} {step['peak_calls']:>5} {step['sut_cpu_pct']:>6.1f} "
        f"{step['cpu_ms_per_call']:>7.3f} {step['machine_busy_pct']:>5.0f} {step['udp_drops']:>6} "
        f"{'yes' if ok else 'NO'} {step['sipp_error'][:60]}",
        flush=True,
    )


def best_held(steps: list[dict[str, Any]], label: str, **criteria: bool) -> dict[str, Any] | None:
    """The highest step of ``label`` held, with every lower step held too."""
    best = None
    for step in sorted((s for s in steps if s["sut"] == label), key=lambda s: s["rate"]):
        if not held(step, **criteria):
            break
        best = step
    return best


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="500,1000,2000,3000,4000")
    parser.add_argument("--secs", type=float, default=10.0)
    parser.add_argument("--no-kamailio", action="store_true")
    parser.add_argument(
        "--log-level", default="warning", help="kx-sipd's (info logs every transaction)"
    )
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",")]
    if shutil.which("sipp") is None:
        print("sipp is not installed (apt-get install sip-tester)")
        return 2
    directory = Path(tempfile.mkdtemp(prefix="kx-bench-register-"))
    print(f"kx-sipd REGISTER bench; {load_note()}; run directory {directory}")
    db = make_kx_database(directory, free_port())
    steps: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        kx, kx_port = stack.enter_context(
            kx_server(directory, db, log_level=args.log_level, rtp_range=free_rtp_block(100),
                      extra=("--relay-shards", "1"))
        )  # fmt: skip
        servers: dict[str, tuple[int, Any]] = {"kx-sipd": (kx_port, anchorlib.TreeCPU(kx.pid))}
        if not args.no_kamailio:
            kam = stack.enter_context(kamailio_server(directory))
            if kam is not None:
                servers["kamailio"] = (KAMAILIO_PORT, anchorlib.TreeCPU(kam.pid))
        for label, (port, _cpu) in servers.items():
            warm_up(port, directory, label)
        settle_kx(directory / "kx-sipd.log", started)
        time.sleep(1.0)
        print(HEADER)
        active = list(servers)
        for rate in rates:
            for label in list(active):
                port, cpu = servers[label]
                step = run_step(
                    label=label,
                    sut_port=port,
                    sut_cpu=cpu,
                    scenario="reg_auth.xml",
                    rate=rate,
                    secs=args.secs,
                    directory=directory,
                )
                steps.append(step)
                ok = held(step)
                show(step, ok)
                if not ok:
                    active.remove(label)  # stepping further only snowballs
                time.sleep(2.0)
            if not active:
                break
    print()
    # Issue #3's target is 3,000 authenticated REGISTER transactions/s. One
    # registration is two REGISTER transactions (the challenged one and the
    # one with credentials), as the anchors count them (RESULTS.md §2a:
    # "4500 registrations/s ... 9 000 auth transactions/s"): 1,500/s here.
    summary(steps, list(servers), unit="registrations/s", target=TARGET_TRANSACTIONS / 2)
    for label in servers:
        step = best_held(steps, label, strict_retrans=True)
        if step is not None:
            print(
                f"{label}: {2 * step['rate']:g} REGISTER transactions/s held "
                f"(target {TARGET_TRANSACTIONS:g} transactions/s)"
            )
    print(f"after the run: {load_note()}")
    return 0


TARGET_TRANSACTIONS = 3000.0


def summary(
    steps: list[dict[str, Any]],
    labels: list[str],
    *,
    unit: str,
    target: float,
    strict_retrans: bool = True,
) -> None:
    best = {label: best_held(steps, label, strict_retrans=strict_retrans) for label in labels}
    for label in labels:
        step = best[label]
        if step is None:
            print(f"{label}: no step held")
            continue
        print(
            f"{label}: highest rate held {step['rate']:g} {unit} "
            f"({step['cpu_ms_per_call']:.3f} ms CPU each, {step['sut_cpu_pct']:.0f} % CPU, "
            f"peak {step['peak_calls']} concurrent)"
        )
    kx = best.get("kx-sipd")
    if kx is not None:
        print(f"kx-sipd vs target {target:g} {unit}: {kx['rate'] / target:.2f}")
    others = [label for label in labels if label != "kx-sipd"]
    for other in others:
        ref = best.get(other)
        if kx is None or ref is None:
            continue
        print(f"ratio kx-sipd / {other}, highest rate held: {kx['rate'] / ref['rate']:.2f}")
        common = [
            (a, b)
            for a in steps
            for b in steps
            if a["sut"] == "kx-sipd" and b["sut"] == other and a["rate"] == b["rate"]
            and held(a, strict_retrans=strict_retrans) and held(b, strict_retrans=strict_retrans)
        ]  # fmt: skip
        if common:
            a, b = max(common, key=lambda pair: pair[0]["rate"])
            print(
                f"ratio kx-sipd / {other}, CPU per call at {a['rate']:g} {unit}: "
                f"{a['cpu_ms_per_call'] / b['cpu_ms_per_call']:.2f} "
                f"({a['cpu_ms_per_call']:.3f} vs {b['cpu_ms_per_call']:.3f} ms)"
            )


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
