"""The only Python face of the C module `_ring`, and the shared-memory segment's life.

The rest of the package imports what the C core offers from here, never from `_ring`: its types
(`Segment`, `Producer`, `Hook`), functions (`pump`, `fork_generation`, `set_thread_rank`), its
numbers named as enums (`LaneState`, `RecordFlag`, `HookKind`, `PumpEvent`), its limits and the
byte sizes of its layout. What C returns as a tuple is named here: `LaneInfo` for a lane's header,
`COUNTERS` for the lane counters that stats() adds up, `LaneRecord` for what `Segment.read`
yields (left a plain tuple: it is made once per record; `LaneReader.feed` unpacks it by name).

A segment is a file in /dev/shm (a RAM file system; the temporary directory where there is none)
mapped with `mmap`. Forked children inherit the mapping; a spawned process attaches by name. The
creator is the only one who unlinks it: `close()` drops this process's mapping, `unlink()` removes
the name. The byte layout is documented at the top of `_ring_src/layout.h`.
"""

from __future__ import annotations

import builtins
import enum
import mmap
import os
import struct
import tempfile
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from safe_redirect import _ring
from safe_redirect._ring import Hook, Producer, Segment, fork_generation, pump, set_thread_rank

if TYPE_CHECKING:
    from safe_redirect.stamp import Stamp

__all__ = [
    "COUNTERS", "LANE_HEADER", "MAX_LANES", "MAX_LANE_BYTES", "MIN_LANE_BYTES", "REC_HEADER",
    "SEG_HEADER", "STREAMS", "STREAM_FDS", "Hook", "HookKind", "LaneInfo", "LaneRecord",
    "LaneState", "Producer", "PumpEvent", "RecordFlag", "Ring", "Segment", "fork_generation",
    "pump", "set_thread_rank", "shm_dir", "stop_inside_next_record", "sweep_orphaned_segments",
]

# Stream numbers as stored in each record.
STREAMS = ("stdout", "stderr")
#: the fd each stream is
STREAM_FDS = {"stdout": 1, "stderr": 2}

#: what a segment may be made of (install() checks its arguments against these)
MAX_LANES: int = _ring.MAX_LANES
MIN_LANE_BYTES: int = _ring.MIN_LANE_BYTES  # a lane's size is a power of two in this range
MAX_LANE_BYTES: int = _ring.MAX_LANE_BYTES

#: byte sizes of the layout: the segment's header, a lane's header, a record's header
SEG_HEADER: int = _ring.SEG_HEADER
LANE_HEADER: int = _ring.LANE_HEADER
REC_HEADER: int = _ring.REC_HEADER


class LaneState(enum.IntEnum):
    """A lane's `state` word (`LaneInfo.state`)."""

    FREE = _ring.LANE_FREE  # nobody's (owner_pid 0), or claimed and not yet set up
    ACTIVE = _ring.LANE_ACTIVE  # its owner writes into it
    CLOSED = _ring.LANE_CLOSED  # its owner closed it: the master drains it, then frees it


class RecordFlag(enum.IntFlag):
    """The `flags` of a record in a lane (`LaneRecord`)."""

    CONT = _ring.FLAG_CONT  # a write larger than half a lane goes on in the next record
    FLUSH = _ring.FLAG_FLUSH  # no payload: the writing thread flushed (its partial line goes out)
    GAP = _ring.FLAG_GAP  # the writer spilled the rest of the line it had open: it ends here


class HookKind(enum.IntEnum):
    """What a `Hook` stands in for."""

    TEXT = _ring.KIND_TEXT  # sys.stdout.write
    FLUSH = _ring.KIND_FLUSH  # sys.stdout.flush
    BYTES = _ring.KIND_BYTES  # sys.stdout.buffer.write
    BUFFER_FLUSH = _ring.KIND_BUFFER_FLUSH  # sys.stdout.buffer.flush
    RAW = _ring.KIND_RAW  # fd mode: the FileIO on fd 1 / 2, written to the saved terminal


class PumpEvent(enum.IntEnum):
    """Why `pump` (fd mode's pump, in C) came back to Python."""

    READY = _ring.PUMP_READY  # data follows an idle spell: read the rank again first
    WAKE = _ring.PUMP_WAKE  # the wake pipe: a sync or stop request
    EOF = _ring.PUMP_EOF  # every writer of one pipe closed it
    REST = _ring.PUMP_REST  # spilling: `rest` is what the lane had no room for
    TIMEOUT = _ring.PUMP_TIMEOUT  # max_seconds in C, busy all along (the rank is read again)
    DRAINED = _ring.PUMP_DRAINED  # drain_only: the pipes are empty
    FULL = _ring.PUMP_FULL  # the lane stayed full for wait_room seconds


#: One record as `Segment.read` returns it: (stream, flags, time_ns, payload, thread,
#: thread_rank). `flags` are RecordFlag bits; `thread` numbers the writing thread within its
#: process; `thread_rank` is that thread's own rank, -1 if it has none.
LaneRecord = tuple[int, int, int, bytes, int, int]


class LaneInfo(NamedTuple):
    """A snapshot of one lane's header (`Segment.lane_info`)."""

    owner_pid: int
    state: int  # a LaneState
    owner_start_us: int
    rank: int  # -1: none
    head: int
    tail: int
    records: int
    bytes: int
    spilled_records: int
    spilled_bytes: int
    stalls: int
    name: builtins.bytes  # `bytes` is a field name here
    pipe_fds: tuple[int, int]  # fd mode: the owner's pipe read ends (stdout, stderr), -1 if none


#: The counters each lane keeps (fields of LaneInfo): stats() adds them up over the lanes in use
#: and those already freed.
COUNTERS = ("records", "bytes", "spilled_records", "spilled_bytes", "stalls")


def stop_inside_next_record(stage: int) -> None:
    """Test hook of the C core: this process stops itself (SIGSTOP) inside the copy of its next
    record: after the header (1), half the payload (2), or all of it before the publish (3)."""
    _ring._stop_inside_next_record(stage)


_PREFIX = "safe_redirect-"
# The head of the segment header (_ring_src/layout.h): magic, version, nlanes, lane_bytes,
# master stamp.
_HEADER = struct.Struct("=QIIQQQ")


_R = TypeVar("_R", bound="Ring")


def shm_dir() -> str:
    """Where segments live: /dev/shm (a RAM file system), else the temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


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
        if lane_bytes < MIN_LANE_BYTES or lane_bytes & (lane_bytes - 1):
            raise ValueError(f"lane_bytes must be a power of two >= {MIN_LANE_BYTES}, "
                             f"not {lane_bytes}")
        if not 1 <= nlanes <= MAX_LANES:
            raise ValueError(f"lanes must be between 1 and {MAX_LANES}, not {nlanes}")
        size = _ring.segment_size(nlanes, lane_bytes)
        # os.urandom, not secrets.token_hex (the same bytes): `import secrets` loads OpenSSL,
        # 3.8 MiB of every master's and attached child's memory
        path = os.path.join(shm_dir(), f"{_PREFIX}{owner.pid}-{os.urandom(4).hex()}")
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
    def attach(cls: type[_R], name: str) -> _R:
        """Map an existing segment by name (a spawned process joining its master)."""
        path = os.path.join(shm_dir(), os.path.basename(name))
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(path, mapping, Segment(mapping), creator=False)

    @property
    def master(self) -> Stamp:
        from safe_redirect.stamp import Stamp  # not at the top: stamp imports fork_generation

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
    from safe_redirect.stamp import Stamp  # as in Ring.master

    removed: list[str] = []
    directory = shm_dir()
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
