"""linphonec (liblinphone's console client), headless, configured as the guide §4.3 says.

linphonec only runs its core loop from readline's idle hook, which readline calls
only on a terminal: it therefore runs on a pseudo-terminal whose output a thread
collects. No sound card: ``soundcard use files`` makes it play a WAV file (a tone
the test writes) as the microphone and record what it hears to another WAV file.
Its debug log (``-d 6 -l FILE``) holds every SIP message it sent and received.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
import wave
from pathlib import Path

from .ports import HOST, free_block, free_port
from .server import REALM

_ESCAPES = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")
KEEP_CODECS = {"PCMU", "PCMA"}


def linphonec_binary() -> str | None:
    return shutil.which("linphonec")


def write_tone(path: Path, seconds: float, *, rate: int = 8000, frequency: float = 440.0) -> None:
    """A 16-bit mono WAV file holding a sine tone."""
    frames = bytearray()
    for index in range(int(seconds * rate)):
        sample = int(8000 * math.sin(2 * math.pi * frequency * index / rate))
        frames += struct.pack("<h", sample)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))


class Linphonec:
    """One linphonec with one account (proxy_0), in its own HOME under ``directory``."""

    def __init__(self, directory: Path, username: str, password: str, server_port: int) -> None:
        self.directory = directory
        self.home = directory / "linphone-home"
        (self.home / ".local" / "share" / "linphone").mkdir(parents=True)  # its call-log DB
        self.config = self.home / "linphonerc"
        self.debug_log = directory / "linphone-debug.log"
        self.screen_log = directory / "linphone-screen.log"
        self.tone = directory / "tone.wav"
        self.recording = directory / "heard.wav"
        write_tone(self.tone, 20.0)
        rtp = free_block(2)
        proxy = f"sip:{HOST}:{server_port};transport=udp"
        # Guide §4.3: identity sip:<user>@sip.kx21.com, the server as proxy and as
        # outbound proxy (reg_route), username/password, no realm (taken from the
        # 401), UDP only; RFC 2833 DTMF (§2), no media encryption (§2: no SRTP).
        self.config.write_text(
            "\n".join(
                [
                    "[sip]",
                    f"sip_port={free_port()}",
                    "sip_tcp_port=0",
                    "sip_tls_port=0",
                    "default_proxy=0",
                    "use_rfc2833=1",
                    "use_info=0",
                    "media_encryption=none",
                    "register_only_when_network_is_up=0",
                    "[rtp]",
                    f"audio_rtp_port={rtp}",
                    "[video]",
                    "enabled=0",
                    "capture=0",
                    "display=0",
                    "[proxy_0]",
                    f"reg_proxy=<{proxy}>",
                    f"reg_route=<{proxy};lr>",
                    f"reg_identity=<sip:{username}@{REALM}>",
                    "reg_expires=300",
                    "reg_sendregister=1",
                    "publish=0",
                    "[auth_info_0]",
                    f"username={username}",
                    f"userid={username}",
                    f"passwd={password}",
                    f"domain={REALM}",
                    "",
                ]
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._master = -1
        self._screen = bytearray()
        self._cursor = 0
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        binary = linphonec_binary()
        assert binary is not None
        master, slave = os.openpty()
        self._master = master
        self.process = subprocess.Popen(
            [binary, "-c", str(self.config), "-d", "6", "-l", str(self.debug_log)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=self.home,
            env={"HOME": str(self.home), "PATH": "/usr/bin:/bin", "TERM": "dumb", "LANG": "C"},
            start_new_session=True,
        )
        os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(r"linphonec> ", timeout=15.0)

    def _read(self) -> None:
        with self.screen_log.open("wb") as log:
            while True:
                try:
                    data = os.read(self._master, 65536)
                except OSError:
                    return
                if not data:
                    return
                log.write(data)
                log.flush()
                with self._lock:
                    self._screen += _ESCAPES.sub(b"", data)

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            # SIGTERM, not "quit": a failed authentication leaves linphonec at a
            # password prompt that would swallow the command. It un-registers and exits.
            process.terminate()
            try:
                process.wait(8)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        if self._master >= 0:
            os.close(self._master)
            self._master = -1
        if self._reader is not None:
            self._reader.join(2.0)

    # --- the console

    def type(self, line: str) -> None:
        """Type one line at the prompt."""
        os.write(self._master, line.encode() + b"\n")

    def screen(self) -> str:
        with self._lock:
            return self._screen.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The next match of ``pattern`` in the console output after the last one
        consumed; fails after ``timeout`` seconds."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            match = compiled.search(text, self._cursor)
            if match is not None:
                self._cursor = match.end()
                return match
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"linphonec: no /{pattern}/ within {timeout} s; console:\n{text[-2000:]}"
                )
            time.sleep(0.05)

    def run(self, command: str, until: str, timeout: float = 10.0) -> re.Match[str]:
        self.type(command)
        return self.wait_for(until, timeout)

    # --- what the guide tells an integrator to set up

    def use_files(self) -> None:
        """No sound card: play the tone file as the microphone, record what is heard."""
        self.run("soundcard use files", r"Using wav files instead of soundcard\.")
        self.type(f"play {self.tone}")
        self.type(f"record {self.recording}")

    def codecs(self) -> dict[str, bool]:
        """``codec list``: {"NAME/RATE": enabled}. linphonec has audio codecs
        whatever its build, so an empty list means the prompt was read before
        the list (a slow, loaded machine): ask again, a bounded number of times."""
        for _ in range(3):
            found = self._codec_list()
            if found:
                return found
            time.sleep(0.5)
        return found

    def _codec_list(self) -> dict[str, bool]:
        self.type("codec list")
        self.wait_for(r"codec list")
        found: dict[str, bool] = {}
        while True:
            match = self.wait_for(
                r"(?m)^\s*(\d+): (\S+) \((\d+)\) (enabled|disabled)\s*\n|linphonec> "
            )
            if match.group(1) is None:
                return found
            found[f"{match.group(2)}/{match.group(3)}@{match.group(1)}"] = (
                match.group(4) == "enabled"
            )

    def keep_only_g711(self) -> None:
        """Guide §4.3 step 6: enable PCMU and PCMA only."""
        for key, enabled in self.codecs().items():
            name, _, index = key.partition("@")
            if enabled and name.split("/")[0] not in KEEP_CODECS:
                self.run(f"codec disable {index}", r"disabled|linphonec> ")

    def registration(self, timeout: float = 10.0) -> str:
        """Poll ``status register`` until the proxy answered; the status line."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.run("status register", r"(?m)^(registered[^\n]*)\n").group(1)
            if line.startswith("registered,") or time.monotonic() >= deadline:
                return line
            time.sleep(0.3)

    def heard_level(self) -> float:
        """RMS of what linphonec recorded from the call (16-bit samples after the WAV
        header; read raw, as the header's length is written only when it closes)."""
        if not self.recording.exists():
            return 0.0
        data = self.recording.read_bytes()[44:]
        samples = struct.unpack(f"<{len(data) // 2}h", data[: len(data) // 2 * 2])
        if not samples:
            return 0.0
        return math.sqrt(sum(sample * sample for sample in samples) / len(samples))

    def sip_messages(self) -> list[str]:
        """Every SIP message in the debug log, in order (belle-sip logs each one whole
        after a "message sent to"/"received [N] new bytes from" line)."""
        if not self.debug_log.exists():
            return []
        messages = []
        lines = self.debug_log.read_text(errors="replace").splitlines()
        index = 0
        while index < len(lines):
            line = lines[index]
            index += 1
            if "message sent to" not in line and "new bytes from" not in line:
                continue
            block = []
            while index < len(lines) and not re.match(r"\d{4}-\d\d-\d\d ", lines[index]):
                block.append(lines[index])
                index += 1
            text = "\n".join(block).strip("\n")
            if text:
                messages.append(("-> " if "message sent to" in line else "<- ") + text)
        return messages
