"""Another process's fds, reached through Linux's /proc.

Two places of fd mode open what another process holds: the master opens a child's pipe read ends
(`/proc/PID/fd/N`) at first sight of its lane, so that what the child wrote is not lost if it
dies before its pump read it; and a spawned child of an fd-mode master reopens the master's
terminal, since the fds 1 and 2 it inherited are the master's pipes. Both need the same care
(the process may be gone, the fd may have become something else), so they live here, apart from
the capture that uses them.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import termios
from collections.abc import Iterable

from safe_redirect.ring import STREAM_FDS

__all__ = ["append_if_regular_file", "open_peer_pipe", "read_available", "reopen_terminal",
           "unread_bytes"]

_CHUNK = 1 << 16


def open_peer_pipe(pid: int, fd: int) -> int | None:
    """Our own read end of another process's pipe (Linux /proc), non-blocking; None if gone."""
    if fd < 0:
        return None
    try:
        ours = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISFIFO(os.fstat(ours).st_mode):
        os.close(ours)
        return None
    return ours


def read_available(fd: int) -> bytes:
    """Everything a non-blocking pipe holds right now."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def unread_bytes(fd: int) -> int:
    """How many bytes a pipe holds (0 once closed or not a pipe)."""
    try:
        unread: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0
    return unread


def reopen_terminal(master_pid: int, terminal_fds: tuple[int, int],
                    streams: Iterable[str]) -> None:
    """In a spawned process of an fd-mode master: fds 1 and 2 are the master's pipes. Point them
    at the master's terminal again, opened anew through /proc. A terminal, a pipe, or a regular
    file the master writes in append mode (its FdCapture sees to that) is reopened so; anything
    else raises and the process stays uncaptured: its output still reaches the master's pipes,
    once."""
    opened: dict[int, int] = {}
    try:
        for name in streams:
            fd = STREAM_FDS[name]
            saved = terminal_fds[fd - 1]
            if saved < 0:
                raise OSError(f"the master saved no fd {fd}")
            new = os.open(f"/proc/{master_pid}/fd/{saved}",
                          os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            opened[fd] = new
            mode = os.fstat(new).st_mode
            if stat.S_ISREG(mode) and not _appends(master_pid, saved):
                raise OSError(f"the master's fd {fd} is a file it does not append to")
            if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISREG(mode)):
                raise OSError(f"the master's fd {fd} is not a terminal, a pipe or a file")
        for fd, new in opened.items():
            os.dup2(new, fd)
    finally:
        for new in opened.values():
            os.close(new)


def _appends(pid: int, fd: int) -> bool:
    """Whether `pid` writes `fd` in append mode (its flags, from /proc/PID/fdinfo)."""
    with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            if line.startswith("flags:"):
                return bool(int(line.split()[1], 8) & os.O_APPEND)
    return False


def append_if_regular_file(fd: int) -> None:
    """A terminal that is a regular file (`python train.py > log`) is written in append mode from
    now on: a spawned child reopens it through /proc, a second open file with an offset of its
    own, and only appending keeps the two from writing over each other. For one writer that
    only writes, as stdout is used, appending and writing at the offset are the same."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & os.O_APPEND:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)
