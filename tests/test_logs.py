"""Journal priorities: under systemd (stderr is the stream JOURNAL_STREAM names) each line
carries the ``<N>`` prefix journald files as its priority, so ``journalctl -p err`` finds
the errors; in a container or a terminal the lines stay plain JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

LOGS = ("from bridge.service.logs import setup_logging; import logging; setup_logging('DEBUG'); "
        "log = logging.getLogger('t'); log.debug('d'); log.info('i'); log.warning('w'); "
        "log.error('e'); log.critical('c')")


def run_logging(journal_stream: str | None, *, socket_stderr: bool) -> list[str]:
    """The lines a real process writes on stderr; the stream is a Unix socket, as
    journald hands a service, or a plain file as a terminal or container log would be."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if socket_stderr:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        st = os.fstat(theirs.fileno())
        if journal_stream == "match":
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        with ours, theirs:
            proc = subprocess.Popen([sys.executable, "-c", LOGS], stderr=theirs.fileno(), env=env)
            theirs.close()
            data = b""
            while chunk := ours.recv(65536):
                data += chunk
            assert proc.wait(timeout=60) == 0
        return data.decode().splitlines()
    with tempfile.TemporaryFile() as out:
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", LOGS], stderr=out, env=env, check=True,
                       timeout=60)
        out.seek(0)
        return out.read().decode().splitlines()


def test_under_systemd_each_line_carries_its_syslog_priority() -> None:
    lines = run_logging("match", socket_stderr=True)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    entries = [json.loads(line[3:]) for line in lines]  # the JSON after it is unchanged
    assert [e["msg"] for e in entries] == ["d", "i", "w", "e", "c"]
    assert entries[3]["level"] == "ERROR"


def test_without_the_journal_the_lines_stay_plain_json() -> None:
    for lines in (run_logging(None, socket_stderr=True),  # a terminal, a container runtime
                  run_logging(None, socket_stderr=False)):
        assert [json.loads(line)["msg"] for line in lines] == ["d", "i", "w", "e", "c"]


def test_an_inherited_journal_stream_that_is_not_stderr_is_ignored() -> None:
    # A service's child whose stderr was redirected (or a container started from a unit)
    # inherits JOURNAL_STREAM; its stderr is not that stream.
    for stale in ("1:2", "match-not", "garbage"):
        lines = run_logging(stale, socket_stderr=True)
        assert [json.loads(line)["msg"] for line in lines] == ["d", "i", "w", "e", "c"]
    other = socket.socketpair()
    st = os.fstat(other[0].fileno())
    lines = run_logging(f"{st.st_dev}:{st.st_ino}", socket_stderr=False)
    other[0].close()
    other[1].close()
    assert all(line.startswith("{") for line in lines) and len(lines) == 5
