"""Processes the development cluster starts, recorded so that it stops exactly those and no other.

A pid alone can be reused by an unrelated process after ours exits, so every record also keeps
the process's start time from /proc; a record whose pid now has another start time is stale and
is dropped without a signal. Each process leads its own process group (a new session), so a
stop reaches its children too (an engine's workers, a compiler it spawned).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name start at field 3


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    started: int  # start_time() when recorded

    def is_ours(self) -> bool:
        return start_time(self.pid) == self.started


class ProcessTable:
    """One JSON file per recorded process in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def record(self, name: str, pid: int) -> ProcessRecord:
        started = start_time(pid)
        if started is None:
            raise RuntimeError(f"{name} (pid {pid}) exited at once")
        entry = ProcessRecord(name, pid, started)
        partial = self._path(name).with_suffix(".tmp")
        partial.write_text(json.dumps(asdict(entry)))
        os.replace(partial, self._path(name))  # a writer killed halfway leaves no truncated record
        return entry

    def forget(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def records(self) -> list[ProcessRecord]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(ProcessRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)
        return found

    def running(self) -> list[ProcessRecord]:
        return [entry for entry in self.records() if entry.is_ours() and alive(entry.pid)]


def spawn(table: ProcessTable, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start `argv` detached from the caller (its own session, output to `log`) and record it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=cwd, start_new_session=True)
    table.record(name, process.pid)
    return process


def stop(entry: ProcessRecord, grace_seconds: float) -> None:
    """SIGTERM the record's process group, then SIGKILL what is left after the grace period."""
    if not entry.is_ours():
        return
    _signal_group(entry.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and alive(entry.pid):
        time.sleep(0.1)
    _signal_group(entry.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """The group `spawn` made (its leader's pid); once the group is gone the pid may be anyone's."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
