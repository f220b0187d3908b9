"""Process plumbing shared by the launchers (``make airflow``, ``make ui``, ``make team``):
a health probe, and stopping a process group so that nothing of it outlives the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request


def healthy(url: str) -> bool:
    """``url`` answers 200 within a few seconds."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_healthy(name: str, proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll ``url`` (every second, at most ``timeout_s``) until it answers; RuntimeError when
    ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not healthy at {url} after {timeout_s:.0f} s")
        time.sleep(1)


def group_members(pgid: int) -> list:
    """Live (non-zombie) processes of a process group."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the whole group, SIGKILL what is left after ``grace_s``; return only when no
    process of the group is alive (the leader exiting first does not end the wait)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(proc.pid):
                return
            time.sleep(0.2)
    proc.poll()
