"""The one place where tests touch safe_redirect's internals.

Tests check behaviour through the public API (`install()`, `Session.flush/stats/is_master/
uninstall`, `Record`). Some must also see or steer what that API does not show: the lane a child
holds, the drain's error count, a record half copied into a lane, the C hook on a stream, whether
a thread sleeps on the segment's doorbell. Each such need is one function here, named for what it
means and written as a one-liner onto today's private attribute, so that a redesign of the
package's centre (issue 13: Session split by role, one Python face for the C core) changes this
file, not the tests. A Session's private attributes are read by four functions only: ring_of,
drain_of, fd_capture_of, drain_fd_pump; the others are built on them.

It imports nothing but safe_redirect: tests/test_pytest_plugin.py copies it beside the test files
of its inner pytest runs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from safe_redirect import hooks, session, spawn
from safe_redirect import ring as c_core
from safe_redirect.drain import Drain, Record
from safe_redirect.fdcapture import FdCapture
from safe_redirect.ring import LaneInfo, Ring
from safe_redirect.session import Session

# -- what the C core defines (named by ring.py, its Python face)

#: record flags, as stored in a lane and returned by Segment.read()
FLAG_FLUSH: int = int(c_core.RecordFlag.FLUSH)
FLAG_GAP: int = int(c_core.RecordFlag.GAP)
#: bytes of a record's header in a lane
REC_HEADER: int = c_core.REC_HEADER
#: what install() accepts at most / at least
MAX_LANES: int = c_core.MAX_LANES
MIN_LANE_BYTES: int = c_core.MIN_LANE_BYTES
MAX_LANE_BYTES: int = c_core.MAX_LANE_BYTES

# the byte layout documented at the top of _ring_src/layout.h
_SEGMENT_SLEEPING, _SEGMENT_BELL = 64, 68  # u32: the drain sleeps on the bell; the bell
_LANE_SPACE_WAITING = 136  # u32 of a lane's header: its producer sleeps for room
_RECORD_HEADER = struct.Struct("=IBBHiIQ")  # len, stream, flags, thread, rank, zero, time_ns


def stop_inside_next_record(stage: int) -> None:
    """Test hook of the C core: this process stops itself (SIGSTOP) inside the copy of its next
    record: after the header (1), half the payload (2), or all of it before the publish (3)."""
    c_core.stop_inside_next_record(stage)


# -- sessions and hooks of this process

def active_sessions() -> list[Session]:
    """The sessions of this process not yet uninstalled, oldest first."""
    return list(session._sessions)


def hook_patches() -> dict[Any, Any]:
    """Every stream attribute our hooks replace now (empty: nothing of ours is left patched)."""
    return dict(hooks._stacks)


def fd_capture_of(s: Session) -> FdCapture | None:
    """fd mode: this process's pipes and their pump (None in wrap mode, or once uninstalled)."""
    return s._writer.fd


def fd_pump_thread(s: Session) -> Any:
    """fd mode: the pump thread of this process's capture (None if it has none)."""
    fd = fd_capture_of(s)
    return None if fd is None else fd.thread


def drain_fd_pump(s: Session) -> None:
    """fd mode: read what this process's pipes hold into its lane now, as a multiprocessing
    child does at exit."""
    s._writer.drain_pump()


def is_hook(writer: object) -> bool:
    """Whether `writer` (say `vars(sys.stdout).get("write")`) is our C write hook."""
    return isinstance(writer, c_core.Hook)


def hook_feeds_a_lane(hook: Any) -> bool:
    """Whether our C write hook still writes into a lane (False: it calls its target only)."""
    return hook.producer is not None


def patch_site_dirs(monkeypatch: Any, dirs: Callable[[], list[str]]) -> None:
    """Where ensure_pth() looks for site-packages directories, for one test."""
    monkeypatch.setattr(spawn, "_site_dirs", dirs)


# -- the segment of a session (in its master)

def ring_of(s: Session) -> Ring:
    """The session's mapped segment."""
    return s._writer.ring


def segment_name(s: Session) -> str:
    """The session's segment, by the name spawned children attach to (a file in /dev/shm)."""
    return ring_of(s).name


def lanes(s: Session) -> dict[int, LaneInfo]:
    """The lanes in use now (the master's own among them), by number."""
    ring = ring_of(s)
    return {lane: ring.lane_info(lane) for lane in ring.segment.busy_lanes()}


def lane_of(s: Session, pid: int) -> int | None:
    """The lane process `pid` writes into, if it holds one."""
    return next((lane for lane, info in lanes(s).items() if info.owner_pid == pid), None)


def lane_info(s: Session, lane: int) -> LaneInfo:
    """A snapshot of one lane's header."""
    return ring_of(s).lane_info(lane)


def set_lane_owner(s: Session, lane: int, pid: int) -> None:
    """Write another owner pid into a lane's header, as if the owner's pid had been reused."""
    ring = ring_of(s)
    struct.pack_into("=Q", ring._mapping, _lane_header(ring, lane), pid)


def lane_bytes_at(s: Session, lane: int, position: int, n: int) -> bytes:
    """`n` bytes of a lane's data ring from ring position `position` on (positions wrap)."""
    ring = ring_of(s)
    cap = ring.segment.lane_bytes
    data = _lane_header(ring, lane) + c_core.LANE_HEADER
    out = bytearray()
    while len(out) < n:
        at = (position + len(out)) % cap
        take = min(n - len(out), cap - at)
        out += ring._mapping[data + at: data + at + take]
    return bytes(out)


def record_header_at(s: Session, lane: int, position: int) -> tuple[int, int, int]:
    """(payload length, stream, time_ns) of the record header at ring position `position`."""
    length, stream, _flags, _thread, _rank, _zero, time_ns = _RECORD_HEADER.unpack(
        lane_bytes_at(s, lane, position, c_core.REC_HEADER))
    return length, stream, time_ns


# -- the drain of a session (in its master)

def drain_of(s: Session) -> Drain | None:
    """The session's reader of the lanes (None outside the master, or once uninstalled)."""
    return s._master.drain if s._master is not None else None


def drain_errors(s: Session) -> int:
    """Drain passes that failed (a torn or corrupt record, a bug): 0 in a healthy session."""
    drain = drain_of(s)
    return drain.errors if drain is not None else 0


def reap_only_on_flush(s: Session) -> None:
    """Lanes of dead children are then freed by flush() only, not every reap interval."""
    drain = drain_of(s)
    assert drain is not None
    drain.reap_interval = 3600.0


def queue_for_pass(drain: Drain, records: list[Record], lane: object) -> None:
    """Queue records read from one lane (`lane`: any key for it) for the drain's current pass."""
    drain._queued.add(records, lane)


def end_pass(drain: Drain, horizon: int | None) -> bool:
    """Deliver the queued records stamped before `horizon` (all if None) merged in time order;
    whether some wait for the next pass."""
    return drain._deliver_in_order(horizon)


# -- wake-ups: the flags and futex words of the segment's header (layout: _ring_src/layout.h)

def drain_waits_on_doorbell(ring: Ring) -> bool:
    """A consumer sleeps in Segment.wait() and a producer's next publish rings the bell."""
    return _u32(ring, _SEGMENT_SLEEPING) == 1


def doorbell_rings(ring: Ring) -> int:
    """How often the segment's doorbell has rung (a counter that wraps)."""
    return _u32(ring, _SEGMENT_BELL)


def producer_waits_for_room(ring: Ring, lane: int) -> bool:
    """The producer of `lane` sleeps in wait_space() until the consumer reads."""
    return _u32(ring, _lane_header(ring, lane) + _LANE_SPACE_WAITING) == 1


def asleep_on_doorbell(ring: Ring, native_id: int) -> bool:
    """Thread `native_id` of this process is blocked in the kernel on the segment's doorbell
    (Linux: its /proc syscall line names the bell's address)."""
    try:
        with open(f"/proc/self/task/{native_id}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 2 and int(fields[1], 16) == _base_address(ring) + _SEGMENT_BELL


def _u32(ring: Ring, offset: int) -> int:
    value: int = struct.unpack_from("=I", ring._mapping, offset)[0]
    return value


def _lane_header(ring: Ring, lane: int) -> int:
    return int(c_core.SEG_HEADER + lane * (c_core.LANE_HEADER + ring.segment.lane_bytes))


def _base_address(ring: Ring) -> int:
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip("\n").endswith(" " + ring.path):
                return int(line.split("-", 1)[0], 16)
    raise LookupError(f"{ring.path} is not mapped in this process")
