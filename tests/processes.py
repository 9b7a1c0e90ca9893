"""Child processes that take their Ray with them.

A command started here gets a session of its own (``start_new_session``); its id is the
child's pid, recorded by the caller. Ray's daemons (GCS, raylet, agents, the client
server, workers) stay in the session of the process that started them, so killing that
session's processes ends all of it, and nothing else: no pattern is matched against
command lines (the client server's and the agents' do not name their temp dir).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except ProcessLookupError:  # ended meanwhile
                continue
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a pid this test started a session with)."""
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def spawn(args: list[str], **kw) -> subprocess.Popen:
    """``subprocess.Popen`` in a session of its own, whose id is the returned process's
    pid (for ``kill_session``); text output to pipes unless ``kw`` says otherwise."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    return subprocess.Popen(args, start_new_session=True, **options)


def run_in_session(args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)`` in a session of its own.
    On timeout every process of the session is killed (the Ray the command started
    included) before ``TimeoutExpired`` is raised."""
    with spawn(args, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
