"""The shared-memory segment: create, attach, close, unlink; lanes read through `_ring`.

A segment is a file in /dev/shm (a RAM file system; the temporary directory where there is none)
mapped with `mmap`. Forked children inherit the mapping; a spawned process attaches by name. The
creator is the only one who unlinks it: `close()` drops this process's mapping, `unlink()` removes
the name. The byte layout is documented at the top of `_ring/layout.h`.
"""

from __future__ import annotations

import builtins
import mmap
import os
import struct
import tempfile
from typing import NamedTuple

from safe_redirect import _ring
from safe_redirect._ring import Producer, Segment
from safe_redirect.stamp import Stamp

__all__ = ["STREAMS", "STREAM_FDS", "LaneInfo", "Producer", "Ring", "Segment",
           "sweep_orphaned_segments"]

# Stream numbers as stored in each record.
STREAMS = ("stdout", "stderr")
#: the fd each stream is
STREAM_FDS = {"stdout": 1, "stderr": 2}

_PREFIX = "safe_redirect-"
# The head of the segment header (_ring/layout.h): magic, version, nlanes, lane_bytes, master stamp.
_HEADER = struct.Struct("=QIIQQQ")


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class LaneInfo(NamedTuple):
    """A snapshot of one lane's header."""

    owner_pid: int
    state: int
    owner_start_us: int
    rank: int
    head: int
    tail: int
    records: int
    bytes: int
    spilled_records: int
    spilled_bytes: int
    stalls: int
    name: builtins.bytes  # `bytes` is a field name here
    pipe_fds: tuple[int, int]  # fd mode: the owner's pipe read ends (stdout, stderr), -1 if none


class Ring:
    """One mapped segment: `nlanes` single-producer rings of `lane_bytes` each."""

    def __init__(self, path: str, mapping: mmap.mmap, segment: Segment, creator: bool) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.segment = segment
        self._mapping = mapping
        self._creator_pid = os.getpid() if creator else 0

    @classmethod
    def create(cls, owner: Stamp, nlanes: int = 64, lane_bytes: int = 1 << 20) -> Ring:
        if lane_bytes < 4096 or lane_bytes & (lane_bytes - 1):
            raise ValueError(f"lane_bytes must be a power of two >= 4096, not {lane_bytes}")
        if not 1 <= nlanes <= 65536:
            raise ValueError(f"lanes must be between 1 and 65536, not {nlanes}")
        size = _ring.segment_size(nlanes, lane_bytes)
        # os.urandom, not secrets.token_hex (the same bytes): `import secrets` loads OpenSSL,
        # 3.8 MiB of every master's and attached child's memory
        path = os.path.join(_shm_dir(), f"{_PREFIX}{owner.pid}-{os.urandom(4).hex()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        _ring.format(mapping, nlanes, lane_bytes, owner.pid, owner.start_us)
        return cls(path, mapping, Segment(mapping), creator=True)

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Map an existing segment by name (a spawned process joining its master)."""
        path = os.path.join(_shm_dir(), os.path.basename(name))
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(path, mapping, Segment(mapping), creator=False)

    @property
    def master(self) -> Stamp:
        return Stamp(self.segment.master_pid, self.segment.master_start)

    def lane_info(self, lane: int) -> LaneInfo:
        return LaneInfo(*self.segment.lane_info(lane))

    def unlink_if_orphaned(self) -> bool:
        """Remove the name if the master died without uninstalling (say, SIGKILL). Any process
        that notices may do it: the name only serves processes that have yet to attach."""
        if self.master.is_alive():
            return False
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        return True

    def close(self) -> None:
        """Drop this process's mapping. Producers made from it detach; idempotent."""
        self.segment.release()
        if not self._mapping.closed:
            self._mapping.close()

    def unlink(self) -> None:
        """Remove the segment's name; only the creating process does (children share the name)."""
        if self._creator_pid != os.getpid():
            return
        self._creator_pid = 0
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        seg = self.segment
        if seg.released:
            return f"<Ring {self.name} released>"
        return f"<Ring {self.name} lanes={seg.nlanes} lane_bytes={seg.lane_bytes}>"


def sweep_orphaned_segments() -> list[str]:
    """Remove the segments in /dev/shm whose master died without uninstalling; their names.

    Run at install(), so that a SIGKILLed master leaks its segment until the next capture at most.
    A segment is judged by the master stamp in its header, so a reused pid does not save it.
    """
    removed: list[str] = []
    directory = _shm_dir()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                header = os.pread(fd, _HEADER.size, 0)
            finally:
                os.close(fd)
        except OSError:
            continue
        if len(header) < _HEADER.size:
            continue  # being created right now
        magic, _version, _nlanes, _lane_bytes, pid, start_us = _HEADER.unpack(header)
        if magic != _ring.SEG_MAGIC or Stamp(pid, start_us).is_alive():
            continue
        try:
            os.unlink(path)
            removed.append(name)
        except OSError:
            pass
    return removed
