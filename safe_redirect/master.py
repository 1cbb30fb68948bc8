"""`Master`: what only the process that called `install()` has.

It owns the segment (created at install, unlinked at the end), reads it on the drain thread
(`drain.py`) and runs the user's callbacks there, tells spawned children where to attach
(`spawn.export`), counts (`Stats`), and at the end gives children a bounded time to finish and
delivers what is left. A forked child inherits this object but never calls it: nothing of the
master's (its thread, its locks, its callbacks) exists or may be waited for there.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from safe_redirect.diagnostics import warn
from safe_redirect.drain import Drain
from safe_redirect.fdcapture import PipeHandOver
from safe_redirect.record import Record
from safe_redirect.ring import COUNTERS, Ring, sweep_orphaned_segments
from safe_redirect.spawn import AttachInfo, ensure_pth, export, unexport
from safe_redirect.stamp import Stamp

__all__ = ["Master", "OnOutput", "OnPassEnd", "Stats", "count"]

OnOutput = Callable[[Record], object]
#: called after each drain pass that may have delivered records: its records can be handed on as
#: one batch; `final` (a flush) when partial lines were delivered too
OnPassEnd = Callable[[bool], object]


@dataclass(frozen=True)
class Stats:
    """Counters of a session, as seen from the calling process."""

    records: int = 0  # records written into lanes (a write larger than half a lane makes several)
    bytes: int = 0  # payload bytes written into lanes
    delivered: int = 0  # Records handed to on_output
    lanes_in_use: int = 0
    lanes_reclaimed: int = 0  # lanes of exited children drained and freed
    spilled_records: int = 0  # writes (or parts) that went to the terminal only
    spilled_bytes: int = 0
    stalls: int = 0  # times a writer found its lane full
    lane_misses: int = 0  # children that found no free lane
    callback_errors: int = 0

    def __str__(self) -> str:
        return " ".join(f"{name}={value}" for name, value in vars(self).items())


def count(ring: Ring, drain: Drain | None, callback_errors: int = 0) -> Stats:
    """The counters of a segment's lanes now (and, with the drain, of the lanes it freed)."""
    seg = ring.segment
    totals = dict.fromkeys(COUNTERS, 0)
    busy = seg.busy_lanes()
    for lane in busy:
        info = ring.lane_info(lane)
        for key in totals:
            totals[key] += getattr(info, key)
    if drain is not None:
        for key in totals:
            totals[key] += drain.retired[key]
    return Stats(delivered=drain.records_delivered if drain else 0, lanes_in_use=len(busy),
                 lanes_reclaimed=drain.lanes_reclaimed if drain else 0,
                 lane_misses=seg.lane_misses, callback_errors=callback_errors, **totals)


class Master:
    """The segment, its reader and the user's callbacks, in the installing process.

    It reads a segment of its own (`create`), or a job's (`job.py`) that it did not make and
    does not end: its siblings go on writing there after it is gone (`owns_ring` False)."""

    def __init__(self, ring: Ring, owner: Stamp, rank: int | None, on_output: OnOutput | None,
                 on_pass_end: OnPassEnd | None, owns_ring: bool = True,
                 claims_lane: bool = True) -> None:
        self.ring = ring
        self.owner = owner
        self.owns_ring = owns_ring
        # a lane for this process's own writes (not claimed where a job's membership writes)
        self.lane = -1
        if claims_lane:
            self.lane = ring.segment.claim(owner.pid, owner.start_us, -1 if rank is None else rank)
        self._on_output = on_output
        self._on_pass_end = on_pass_end
        self.callback_errors = 0
        self.drain: Drain | None = None
        self.hand_over: PipeHandOver | None = None  # fd mode: forked children's pipes
        self._attach_info: AttachInfo | None = None
        self._previous_env: str | None = None
        # uninstall() and stats() from several threads at once (a with-block and atexit, say)
        # must not see the segment released under them; a child never takes it
        self.lock = threading.RLock()

    @classmethod
    def create(cls, owner: Stamp, rank: int | None, lanes: int, lane_bytes: int,
               on_output: OnOutput | None, on_pass_end: OnPassEnd | None) -> Master:
        """A master with a segment of its own (and the orphans of killed masters removed)."""
        sweep_orphaned_segments()
        return cls(Ring.create(owner, lanes, lane_bytes), owner, rank, on_output, on_pass_end)

    def start_drain(self, tag: str, fd_mode: bool, tee: Callable[[int, bytes], None],
                    on_new_thread: Callable[[int], None]) -> int:
        """The drain thread starts reading; its ident (our hooks must not capture it).
        `tee`: what the drain recovers from a dead child's pipe, for the terminal;
        `on_new_thread`: the ident of a drain thread started again after a fork."""
        own_lane = self.lane if self.owns_ring else -1  # a job's ranks are all tagged
        self.drain = Drain(self.ring, self._deliver, tag, own_lane, tee, self._pass_end)
        self.drain.on_restart = on_new_thread
        ident = self.drain.start()
        if fd_mode:
            self.hand_over = self.drain.hand_over = PipeHandOver()
        return ident

    @property
    def reading(self) -> bool:
        return self.drain is not None and self.drain.alive

    def export(self, info: AttachInfo) -> None:
        """Spawned children attach to this segment (the environment they inherit says where)."""
        self._attach_info = info
        if ensure_pth() is None:
            warn("safe_redirect: no writable site-packages for safe_redirect.pth: spawned "
                 "processes will not be captured")
        self._previous_env = export(info)

    def unexport(self) -> None:
        if self._attach_info is not None:
            unexport(self._attach_info, self._previous_env)

    # -- the user's callbacks, on the drain thread

    def _deliver(self, record: Record) -> None:
        if self._on_output is None:
            return
        try:
            self._on_output(record)
        except BaseException:  # a KeyboardInterrupt there must not end the drain
            self._callback_failed("on_output")

    def _pass_end(self, final: bool) -> None:
        if self._on_pass_end is None:
            return
        try:
            self._on_pass_end(final)
        except Exception:
            self._callback_failed("on_pass_end")

    def _callback_failed(self, name: str) -> None:
        self.callback_errors += 1
        if self.callback_errors == 1:
            warn(f"safe_redirect: {name} raised (reported once; counted in "
                 "stats().callback_errors):\n" + traceback.format_exc())

    # -- delivery

    def sync(self, timeout: float | None, child_pipes: bool) -> bool:
        """Everything published so far delivered; fd mode (`child_pipes`): also what live
        children's pipes hold that their pumps have not read yet."""
        assert self.drain is not None
        if child_pipes:
            return self.drain.sync_child_pipes(timeout)
        return self.drain.sync(timeout)

    def wait_for_children(self, deadline: float) -> None:
        """At exit, give children that are still writing a bounded time to finish: wait until no
        child lane has moved for `quiet` seconds (an idle pool worker does not hold us up)."""
        quiet, last_change, last_tails = 0.1, time.monotonic(), None
        while time.monotonic() < deadline:
            tails = {lane: self.ring.lane_info(lane).tail
                     for lane in self.ring.segment.busy_lanes() if lane != self.lane}
            now = time.monotonic()
            if not tails:
                return
            if tails != last_tails:
                last_tails, last_change = tails, now
            elif now - last_change >= quiet:
                return
            time.sleep(0.01)

    def close(self, timeout: float | None) -> bool:
        """Children still writing detach at their next write, *then* the final drain: whatever a
        child published before that is delivered; nothing is left unread in a lane. Whether all
        was delivered in time."""
        if self.owns_ring:
            self.ring.segment.mark_closed()
        assert self.drain is not None
        return self.drain.stop(timeout)

    def stats(self) -> Stats:
        return count(self.ring, self.drain, self.callback_errors)

    def abandon(self) -> None:
        """The session could not start: undo what was done, bounded."""
        if self.drain is not None:
            self.drain.stop(timeout=1.0)
        if self.hand_over is not None:
            self.hand_over.close()
        self.ring.close()
        self.ring.unlink()
