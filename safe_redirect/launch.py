"""`safe-redirect run -- COMMAND`: a command's whole process tree captured, tagged, logged.

The command runs under a capture of this process (fd mode): Python processes of its tree attach
through the start-up `.pth` (forks follow their parent), and write into lanes of their own;
what else writes to the inherited fds 1 and 2 (a shell, a C program) lands in our pipes. Every
process's terminal is /dev/null meanwhile: this process alone writes the terminal, each line
under its process's tag (`runview.py`), so that the live view reads as the logs do. With
`--log-dir`, one file per rank (else per process name, else pid; the command's own untagged lines
in `main.log`) and `all.log`, the tagged merge, each line written once it is finished, in its last
state (a progress bar's last drawing).

The job runs in a process group of its own: SIGINT and SIGTERM are passed on to it (a second
Ctrl-C kills it), and what is left of the group when the command ends is stopped. The exit code
is the command's (128 + N when a signal N ended it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TextIO

from safe_redirect.dedup import Dedup
from safe_redirect.record import LastStates, Record
from safe_redirect.runview import TerminalView
from safe_redirect.session import Session, install
from safe_redirect.spawn import PATCH_VAR

__all__ = ["run"]

#: how long what is left of the job's process group gets after the command ended, seconds
LEFTOVER_GRACE = 2.0


class JobLog:
    """Where the records go: the terminal (`runview.py`), and the files of `--log-dir`, each
    line in its last state (a progress bar's last drawing), written as lines are finished."""

    def __init__(self, out: int, err: int, log_dir: Path | None, ranks: frozenset[int] | None,
                 dedup: Dedup | None, color: bool) -> None:
        self.main_pid = -1  # the command's process, once started: its lines are untagged
        self._view = TerminalView(out, err, color)
        self._ranks = ranks  # shown on the terminal (None: all); the files get every rank
        self._dedup = dedup
        self._dir = log_dir
        self._files: dict[str, TextIO] = {}
        self._states = LastStates()
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._files["all"] = self._open("all")

    def _open(self, name: str) -> TextIO:
        assert self._dir is not None
        return open(self._dir / f"{name}.log", "a", encoding="utf-8", errors="replace")

    def _file(self, record: Record) -> TextIO:
        if not record.tag:
            name = "main"
        elif record.rank is not None:
            name = f"rank{record.rank}"
        else:
            name = record.tag.strip().strip("[]").replace("/", "_") or f"pid{record.pid}"
        file = self._files.get(name)
        if file is None:
            file = self._files[name] = self._open(name)
        return file

    def on_output(self, record: Record) -> None:
        """On the drain thread: one record to the terminal and the logs."""
        if record.pid == self.main_pid and record.rank is None:
            record = replace(record, tag="")  # the command itself: untagged, as a master's
        if self._ranks is None or record.rank is None or record.rank in self._ranks:
            self._view.show(record, self._shown)
        if self._dir is not None:
            self._log(self._states.feed(record))

    def _shown(self, source: Record, line: str) -> bool:
        return self._dedup is None or self._dedup.show(source.stream, source.pid, source.tag,
                                                       line, source.time_ns)

    def _log(self, lines: list[tuple[Record, str]]) -> None:
        for source, line in lines:
            self._file(source).write(line + "\n")
            self._files["all"].write(f"{source.tag}{line}\n")

    def on_pass_end(self, final: bool) -> None:
        """What a pass finished is in the files before the next: a crash loses none of it.
        `--dedup`: the summaries of the windows that have passed."""
        if self._dedup is not None:
            for stream, line in self._dedup.due(None if final else time.time_ns()):
                self._view.note(stream, line)
        self._view.refresh()
        for file in self._files.values():
            file.flush()

    def close(self) -> None:
        if self._dir is not None:
            self._log(self._states.end())
        self._view.close()
        for file in self._files.values():
            file.close()


class _Signals:
    """SIGINT / SIGTERM of ours go to the job's process group; a second SIGINT kills it."""

    def __init__(self, pgid: int) -> None:
        self._pgid = pgid
        self._interrupts = 0
        self._previous = {sig: signal.signal(sig, self._forward)
                          for sig in (signal.SIGINT, signal.SIGTERM)}

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                signum = signal.SIGKILL
        _kill_group(self._pgid, signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _kill_group(pgid: int, signum: int) -> bool:
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_leftovers(pgid: int) -> None:
    """The command ended: what is left of its process group (a daemon it did not wait for)
    gets SIGTERM, then SIGKILL after LEFTOVER_GRACE seconds. No process is left behind."""
    if not _kill_group(pgid, 0) or not _kill_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + LEFTOVER_GRACE
    while time.monotonic() < deadline:
        if not _kill_group(pgid, 0):
            return
        time.sleep(0.02)
    _kill_group(pgid, signal.SIGKILL)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(command: Sequence[str], log_dir: Path | None = None, tag: str = "[rank{rank}] ",
        wandb: bool = False, ranks: frozenset[int] | None = None,
        dedup_window: float | None = None, color: bool = True) -> int:
    """Run `command`, its whole process tree captured (see the module); its exit code."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("safe_redirect.launch.run() takes signals: call it on the main thread")
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = os.dup(1), os.dup(2)  # the terminal: ours alone from now on
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the processes' own terminal (they reopen ours) is /dev/null
    os.dup2(devnull, 2)
    os.close(devnull)
    log: JobLog | None = None
    session: Session | None = None
    try:
        log = JobLog(out, err, log_dir, ranks,
                     None if dedup_window is None else Dedup(dedup_window), color)
        session = install(on_output=log.on_output, on_pass_end=log.on_pass_end, mode="fd",
                          tag=tag)
        env = dict(os.environ)  # with what install() exported: where processes attach
        if wandb:
            env[PATCH_VAR] = "wandb"
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {
            "start_new_session": True}
        try:
            proc = subprocess.Popen(list(command), env=env, **group)
        except OSError as exc:
            os.write(err, f"safe-redirect run: cannot run {command[0]!r}: {exc}\n".encode())
            return 127 if isinstance(exc, FileNotFoundError) else 126
        log.main_pid = proc.pid
        signals = _Signals(proc.pid)
        try:
            while True:
                try:
                    returncode = proc.wait()
                    break
                except KeyboardInterrupt:  # a SIGINT between our handler's install and here
                    _kill_group(proc.pid, signal.SIGINT)
        finally:
            signals.restore()
        _stop_leftovers(proc.pid)
        return _exit_code(returncode)
    finally:
        if session is not None:
            session.uninstall(timeout=10.0)
        if log is not None:
            log.close()
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
