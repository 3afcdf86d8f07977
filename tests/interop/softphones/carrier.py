"""The carrier trunk: a SIPp UAS (carrier_uas.xml) for the signalling and a
MediaEndpoint of the test's own for the media its SDP answer points at."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .ports import HOST, free_block, free_port
from .rtp import MediaEndpoint

SCENARIO = Path(__file__).resolve().parent / "carrier_uas.xml"
RUN_LIMIT = 60  # seconds SIPp may run in all (its -timeout): one call, then it exits


class Carrier:
    """``start`` binds the media socket and launches SIPp; ``finish`` waits for SIPp's
    exit (one call done) and returns its exit status (0: the call went as scripted).

    The answer carries telephone-event under the offer's payload type number, or
    under ``telephone_event`` when given (a carrier that numbers it its own way)."""

    def __init__(self, directory: Path, port: int, telephone_event: int | None = None) -> None:
        self.directory = directory
        self.port = port
        self.scenario = SCENARIO
        if telephone_event is not None:
            self.scenario = directory / f"carrier_uas_te{telephone_event}.xml"
            text = SCENARIO.read_text().replace("[$te]", str(telephone_event))
            # SIPp refuses a variable that is assigned and never used
            text = text.replace('assign_to="te_line,te"', 'assign_to="te_line"')
            self.scenario.write_text(text)
        self.media = MediaEndpoint(free_port())
        self.messages_path = directory / "carrier-messages.log"
        self.errors_path = directory / "carrier-errors.log"
        self.screen_path = directory / "carrier-screen.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        sipp_media = free_block(4)  # SIPp binds its own RTP echo ports; keep them apart
        command = [
            "sipp",
            "-sf",
            str(self.scenario),
            "-i",
            HOST,
            "-p",
            str(self.port),
            "-mi",
            HOST,
            "-mp",
            str(sipp_media),
            "-key",
            "rtp_port",
            str(self.media.port),
            "-m",
            "1",
            "-nostdin",
            "-trace_msg",
            "-message_file",
            str(self.messages_path),
            "-trace_err",
            "-error_file",
            str(self.errors_path),
            "-timeout",
            f"{RUN_LIMIT}s",
            "-timeout_error",
        ]
        with self.screen_path.open("wb") as screen:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=screen,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )

    def finish(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError("the carrier's SIPp did not finish its one call") from None

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.media.close()

    def received(self, method: str) -> list[str]:
        """The requests (or responses, for a status code) SIPp logged as received."""
        if not self.messages_path.exists():
            return []
        # Blocks: a line of dashes and a time, "UDP message received [N] bytes :", a
        # blank line, the message (CRLF line ends).
        text = self.messages_path.read_text(errors="replace")
        found = []
        for block in re.split(r"^-{10,}[^\n]*\n", text, flags=re.MULTILINE):
            kind, _, message = block.partition("\n")
            if "message received" not in kind:
                continue
            message = message.lstrip("\r\n").rstrip("\n")
            if message.startswith(method):
                found.append(message)
        return found

    def diagnostics(self) -> str:
        parts = []
        for path in (self.screen_path, self.errors_path, self.messages_path):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)
