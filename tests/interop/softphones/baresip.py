"""baresip, headless, configured as the guide §4.1 says and driven over its ctrl_tcp module.

No sound card: the microphone is the ``ausine`` module (a 440 Hz tone, so RTP
flows continuously) and the speaker is ``aubridge`` with no reader (a sink).
Commands and events are JSON in netstrings on a loopback TCP port; SIP is traced
(``-s``) into the log file the tests read the wire from.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .ports import HOST, free_block, free_port
from .server import REALM

MODULE_PATH = Path("/usr/lib/baresip/modules")
START_WAIT = 10.0


def baresip_binary() -> str | None:
    return shutil.which("baresip")


class Baresip:
    """One baresip process with one account, in its own HOME under ``directory``."""

    def __init__(self, directory: Path, username: str, password: str, server_port: int) -> None:
        self.home = directory / "baresip-home"
        self.config_dir = self.home / ".baresip"
        self.config_dir.mkdir(parents=True)
        self.log_path = directory / "baresip.log"
        self.sip_port = free_port()
        self.control_port = free_port(tcp=True)
        rtp_low = free_block(10)
        self.username = username
        (self.config_dir / "config").write_text(
            "\n".join(
                [
                    "poll_method epoll",
                    f"sip_listen {HOST}:{self.sip_port}",
                    "sip_transports udp",
                    f"net_interface {HOST}",
                    f"rtp_ports {rtp_low}-{rtp_low + 9}",
                    "audio_player aubridge,nil",
                    "audio_alert aubridge,nil",
                    "audio_source ausine,440",
                    "ausrc_srate 48000",
                    "ausrc_channels 2",
                    f"module_path {MODULE_PATH}",
                    "module g711.so",
                    "module ausine.so",
                    "module aubridge.so",
                    "module_app menu.so",
                    "module_app ctrl_tcp.so",
                    f"ctrl_tcp_listen {HOST}:{self.control_port}",
                    "",
                ]
            )
        )
        # Guide §4.1: domain sip.kx21.com, username = authentication name, password,
        # UDP, outbound proxy = the server; no realm (baresip takes it from the 401);
        # §4.2: PCMU and PCMA only.
        (self.config_dir / "accounts").write_text(
            f"<sip:{username}@{REALM};transport=udp>;auth_user={username};auth_pass={password};"
            f'outbound="sip:{HOST}:{server_port};transport=udp";regint=300;'
            "audio_codecs=PCMU,PCMA\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self._token = 0

    def start(self) -> None:
        binary = baresip_binary()
        assert binary is not None
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-f", str(self.config_dir), "-s"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                env={"HOME": str(self.home), "PATH": "/usr/bin:/bin", "LANG": "C"},
            )
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.control = socket.create_connection((HOST, self.control_port), timeout=0.2)
                self.control.settimeout(0.1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("baresip did not open its control port:\n" + self.log_text()[-3000:])

    def stop(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()  # baresip un-registers, then exits
        try:
            process.wait(8)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode(errors="replace")  # CRLFs kept

    # --- control protocol: {"command", "params", "token"} out; responses and events in

    def command(self, name: str, params: str = "", timeout: float = 5.0) -> dict[str, Any]:
        """Run a menu command; its response (``ok``, ``data``)."""
        assert self.control is not None
        self._token += 1
        token = f"t{self._token}"
        body = json.dumps({"command": name, "params": params, "token": token}).encode()
        self.control.sendall(str(len(body)).encode() + b":" + body + b",")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self._pump():
                if message.get("response") and message.get("token") == token:
                    return message
        raise AssertionError(f"baresip gave no answer to {name} {params}")

    def _pump(self) -> list[dict[str, Any]]:
        """Read what is there (waiting up to 0.1 s); responses returned, events kept."""
        assert self.control is not None
        try:
            chunk = self.control.recv(65536)
        except TimeoutError:
            chunk = b""
        self._buffer += chunk
        messages = []
        while b":" in self._buffer:
            length_text, _, rest = self._buffer.partition(b":")
            length = int(length_text)
            if len(rest) < length + 1:
                break
            message = json.loads(rest[:length])
            self._buffer = rest[length + 1 :]
            if message.get("event"):
                self.events.append(message)
            messages.append(message)
        return messages

    def wait_event(self, *types: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first event (since start) of one of these types not yet consumed."""
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if event.get("type") in types:
                    del self.events[index]
                    return event
            if time.monotonic() >= deadline:
                break
            self._pump()
        seen = [event.get("type") for event in self.events]
        raise AssertionError(f"baresip: no {types} event within {timeout} s (pending: {seen})")

    def register(self, timeout: float = 10.0) -> dict[str, Any]:
        """Load the account module now that events are heard: it sends the REGISTER.
        The REGISTER_OK or REGISTER_FAIL event (``param``: status line) is returned."""
        response = self.command("insmod", "account")
        assert response["ok"], response
        return self.wait_event("REGISTER_OK", "REGISTER_FAIL", timeout=timeout)

    def dial(self, number: str) -> None:
        response = self.command("dial", number)
        assert response["ok"], response

    def send_digits(self, digits: str) -> None:
        response = self.command("sndcode", digits)
        assert response["ok"], response

    def hangup(self) -> None:
        response = self.command("hangup")
        assert response["ok"], response

    def rtp_figures(self) -> tuple[int, int]:
        """(packets sent, packets received) by baresip's audio stream in the current call,
        from its own RTCP session table (``audio_debug``: ``TX: packets=N`` and one
        ``rcvd=N`` per source it heard)."""
        text = str(self.command("audio_debug").get("data", ""))
        sent = re.search(r"TX: packets=(\d+)", text)
        received = sum(int(count) for count in re.findall(r"\brcvd=(\d+)", text))
        assert sent is not None, f"baresip audio_debug without TX figures:\n{text}"
        return int(sent.group(1)), received

    def sip_messages(self) -> list[str]:
        """The SIP trace (``-s``): each message's text, in order, prefixed with
        ``-> `` when baresip sent it and ``<- `` when it received it."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log_text())
        messages = []
        for block in re.split(r"(?m)^#\n", text)[1:]:
            route, _, raw = block.partition("\n")
            match = re.match(r"UDP (\S+) -> (\S+)", route)
            if match is None:
                continue
            head, _, rest = raw.partition("\r\n\r\n")
            length = re.search(r"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
            body = rest[: int(length.group(1))] if length else ""
            sent = match.group(1).endswith(f":{self.sip_port}")
            message = (head + "\r\n\r\n" + body).replace("\r\n", "\n").rstrip("\n")
            messages.append(("-> " if sent else "<- ") + message)
        return messages
