"""The master's reader: one thread empties the lanes and hands their lines to the callback.

Callbacks run here and only here, never on a writer's thread: a `print` costs a copy into shared
memory, a slow or failing callback cannot stall or break a writer, and all processes meet at one
ordering point: each pass merges what the lanes held in time order. Here too: the lanes of exited
children are drained and freed (reaped), and the drain thread ends around a fork and starts anew
after it (`fork_parking.py`). Where the rest lives: the line rebuild of one lane is
`lanereader.py`, what it makes (`Record`) is `record.py` (also importable from here, as it used to
be), fd mode's second way out of a child (its pipes) is `childpipes.py`.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable
from operator import attrgetter

from safe_redirect import fork_parking
from safe_redirect.childpipes import ChildPipes
from safe_redirect.diagnostics import warn
from safe_redirect.fdcapture import PipeHandOver
from safe_redirect.lanereader import JOIN_GAP_NS, LaneReader
from safe_redirect.record import Interleaver, Record  # re-exported
from safe_redirect.ring import COUNTERS, LaneInfo, LaneState, Ring
from safe_redirect.stamp import Stamp

__all__ = ["Drain", "Interleaver", "Record"]


class _LaneReaders:
    """The LaneReader of each lane in use, made when a pass first finds the lane claimed, tagged
    with its owner's rank and name as they are when its records are fed."""

    def __init__(self, ring: Ring, tag_template: str, master_lane: int,
                 opened: Callable[[int, LaneInfo], None]) -> None:
        self._ring = ring
        self._segment = ring.segment
        self._tag_template = tag_template
        self._master_lane = master_lane
        self._opened = opened  # called with (lane, its header) once its reader is made
        self._by_lane: dict[int, LaneReader] = {}

    def get(self, lane: int) -> LaneReader | None:
        """The reader of `lane`; None while the lane is being claimed."""
        reader = self._by_lane.get(lane)
        if reader is not None:
            return reader
        identity = self._segment.identity(lane)  # before the header: a change after it is seen
        info = self._ring.lane_info(lane)
        if info.state == LaneState.FREE:
            return None  # being claimed right now
        rank = None if info.rank < 0 else info.rank
        reader = self._by_lane[lane] = LaneReader(
            info.owner_pid, info.owner_start_us, rank, info.name.decode("utf-8", "replace"),
            self._tag_template, master=lane == self._master_lane)
        reader.refresh = lambda: self._refresh_identity(lane, reader, identity)
        self._opened(lane, info)
        return reader

    def drop(self, lane: int) -> None:
        """`lane` was freed: its next owner gets a reader of its own."""
        self._by_lane.pop(lane, None)

    def _refresh_identity(self, lane: int, reader: LaneReader, seen: int) -> None:
        """Render the tag of `lane` again if its owner set rank and name anew since `seen`
        (read after the records being fed, so that they are tagged as their writer wanted)."""
        identity = self._segment.identity(lane)
        if identity == seen:
            return
        info = self._ring.lane_info(lane)
        if self._segment.identity(lane) != identity:
            return  # set anew while we read it: next time
        reader.rename(None if info.rank < 0 else info.rank, info.name.decode("utf-8", "replace"))
        reader.refresh = lambda: self._refresh_identity(lane, reader, identity)


class _PassQueue:
    """What a pass read, lane by lane, for delivery in one order across processes: the records
    stamped before the pass began go out merged by `time_ns`, a stable merge that keeps each
    lane's own order (per process, stream and thread); the rest of a lane, from its first later
    record on, waits for the next pass, whose sweep reads every lane again."""

    def __init__(self) -> None:
        self._by_lane: dict[object, list[Record]] = {}

    def add(self, records: list[Record], lane: object) -> None:
        """Queue `records` of one lane (`lane`: any key for it, its reader), in their order."""
        if records:
            self._by_lane.setdefault(lane, []).extend(records)

    def take(self, horizon: int | None) -> Iterable[Record]:
        """The queued records stamped before `horizon` (all if None), merged in time order;
        the rest stay queued."""
        queued, self._by_lane = self._by_lane, {}
        ready: list[list[Record]] = []
        for lane, records in queued.items():
            cut = len(records)
            if horizon is not None:
                cut = next((i for i, r in enumerate(records) if r.time_ns >= horizon), cut)
                if cut < len(records):
                    self._by_lane[lane] = records[cut:]
            if cut:
                ready.append(records[:cut] if cut < len(records) else records)
        return ready[0] if len(ready) == 1 else heapq.merge(*ready, key=_time_ns)

    @property
    def waiting(self) -> bool:
        """Records wait for the next pass."""
        return bool(self._by_lane)


class Drain:
    """The drain thread of a master: `start()`, `sync(timeout)`, `stop(timeout)`.

    `deliver(record)` is called on the drain thread only, `pass_end(final)` there after each pass
    over the lanes (`final`: a sync's pass). `sync()` returns once every record that was published
    before it was called has been delivered, partial lines included.
    """

    #: while several lanes hold data, a pass takes about this much from each, and the next pass
    #: follows without a pause: a lane printing flat out does not hold back the lines of the
    #: others for long (benchmarks/bench_latency.py under load, p99 of a quiet child's line:
    #: fd mode 12.7 ms -> 1.7 ms, wrap 6.7 -> 0.8 ms)
    max_read = 1 << 16
    #: while a pass's records are being delivered (slow callbacks), the lanes are read again for
    #: the next pass this often, seconds: below any sensible stall_timeout
    read_ahead_interval = 0.05
    #: how often lanes of exited children are looked for, seconds
    reap_interval = 0.2
    #: how long the thread sleeps with the doorbell armed before it looks anyway, seconds
    idle_poll = 0.1
    #: after a pass that found data, how long to let more collect before the next pass, seconds.
    #: Measured: 0.5 ms keeps the drain ahead of a child printing flat out (hooked/plain 1.20;
    #: 1 ms: 1.38); a printing master prefers a longer one, hence master_pause.
    batch_pause = 0.0005
    #: the same when only the master's own lane had data: its lines are rebuilt on this thread,
    #: which takes the GIL from the printing thread once per pass. Measured (a printing master,
    #: hooked/unhooked): 0.5 ms 1.80-1.92x, 2 ms 1.48-1.58x, 4 ms 2.0x (its lane fills).
    master_pause = 0.002

    def __init__(self, ring: Ring, deliver: Callable[[Record], None], tag_template: str,
                 master_lane: int,
                 recovered: Callable[[int, bytes], None] = lambda stream, data: None,
                 pass_end: Callable[[bool], None] = lambda final: None) -> None:
        self._ring = ring
        self._segment = ring.segment
        self._deliver = deliver
        self._pipes = ChildPipes(ring, master_lane, recovered)  # fd mode's
        self._pass_end = pass_end  # after each pass: what it delivered can go on as a batch
        self._master_lane = master_lane
        self._readers = _LaneReaders(ring, tag_template, master_lane, opened=self._pipes.open)
        self._queued = _PassQueue()  # what this pass read, for delivery in time order
        self._cond = threading.Condition()
        self._requested = 0  # sync requests made
        self._completed = 0  # sync requests served
        self._stopping = False
        self._next_reap = 0.0
        # the thread ends between passes around a fork (fork_parking) and a new one goes on
        self._worker = fork_parking.ParkableThread(
            "safe_redirect-drain", self._run, self._cond, self._segment.wake,
            stopping=lambda: self._stopping, restarted=lambda ident: self.on_restart(ident))
        #: called with the ident of every thread started after the first (after a fork)
        self.on_restart: Callable[[int], None] = lambda ident: None
        self._lane_misses_seen = 0
        # totals of lanes already freed, so that stats survive lane reuse
        self.retired = dict.fromkeys(COUNTERS, 0)
        self.lanes_reclaimed = 0
        self.records_delivered = 0
        self.errors = 0

    @property
    def hand_over(self) -> PipeHandOver | None:
        """fd mode: forked children hand their pipes over through it (None: /proc only)."""
        return self._pipes.hand_over

    @hand_over.setter
    def hand_over(self, hand_over: PipeHandOver | None) -> None:
        self._pipes.hand_over = hand_over

    @property
    def alive(self) -> bool:
        return self._worker.alive

    def start(self) -> int:
        return self._worker.start()

    def sync(self, timeout: float | None) -> bool:
        """Deliver everything published so far, partial lines included. False on timeout."""
        fork_parking.resume_now()
        thread = self._worker.thread
        if thread is None or threading.get_ident() == thread.ident:
            self._pass(final=True)
            self._pass_end(True)
            return True
        with self._cond:
            self._requested += 1
            target = self._requested
        self._segment.wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._completed < target and self._worker.alive:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._completed >= target

    def stop(self, timeout: float | None) -> bool:
        """A final sync, then the thread ends. Idempotent."""
        if self._worker.thread is None:
            return True
        fork_parking.unregister(self._worker)
        delivered = self.sync(timeout)
        with self._cond:
            self._stopping = True
        self._segment.wake()
        thread = self._worker.thread
        thread.join(timeout)
        stopped = not thread.is_alive()
        if stopped:
            self._pipes.close_all()
        return delivered and stopped

    def sync_child_pipes(self, timeout: float | None) -> bool:
        """fd mode: wait (bounded) until each live child's pump has read what its pipes held at
        the call (see ChildPipes.wait_for_pumps), then sync. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._pipes.wait_for_pumps(deadline):
            return False
        return self.sync(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- the thread

    def _run(self) -> None:
        next_reap = self._next_reap  # a thread started after a fork goes on with the schedule
        while True:
            with self._cond:
                requested, stopping = self._requested, self._stopping
                if self._worker.leaving_for_fork():
                    return
            final = requested > self._completed
            try:
                now = time.monotonic()
                if final or now >= next_reap or self._segment.lane_misses != self._lane_misses_seen:
                    self._lane_misses_seen = self._segment.lane_misses
                    self._reap()
                    next_reap = self._next_reap = now + self.reap_interval
                found, more, children = self._pass(final)
                self._pass_end(final)
            except Exception as exc:  # a bug here must not kill capture for good
                if self._segment.released:
                    return  # stop() timed out (a callback too slow) and the segment went
                self.errors += 1
                warn(f"safe_redirect: drain pass failed: {exc!r}")
                found = more = children = False
            if final:
                with self._cond:
                    self._completed = requested
                    self._cond.notify_all()
            if stopping:
                return
            if more:
                continue
            try:
                if found:
                    self._segment.pause(self.batch_pause if children else self.master_pause)
                else:
                    self._segment.wait(self.idle_poll)
            except ValueError:
                if self._segment.released:
                    return  # as above: nothing is left to read
                raise

    def _pass(self, final: bool) -> tuple[bool, bool, bool]:
        """Read every lane once: (anything read or still held, a lane gave all a pass takes and
        may hold more, a lane other than the master's had data)."""
        found = more = children = False
        # what was stamped before the sweep began goes out now, merged in time order; a record
        # stamped later waits for the next pass, whose sweep reads every lane after it: a line
        # published before another was stamped is delivered before it, whichever lane was read
        # first (see _PassQueue)
        horizon = time.time_ns()
        # one lane with data: take all it holds; several: a bite of each, round and round
        bite = 1 << 62 if final or self._segment.lanes_with_data() < 2 else self.max_read
        for lane in self._segment.busy_lanes():
            reader = self._readers.get(lane)
            if reader is None:
                continue
            records = self._segment.read(lane, bite, JOIN_GAP_NS)
            if records:
                found = True
                children = children or lane != self._master_lane
                if not final and sum(len(r[3]) for r in records) >= bite:  # r[3]: payload
                    more = True  # this lane may hold more: no pause before the next pass
                self._queued.add(reader.feed(records), reader)
            if final:
                self._queued.add(reader.flush(), reader)
        # final (sync, the last pass): everything read goes; so does all once the thread stops
        held = self._deliver_in_order(None if final or self._stopping else horizon)
        return found or held, more, children

    def _deliver_in_order(self, horizon: int | None) -> bool:
        """Deliver what this pass queued that was stamped before `horizon` (all if None), in
        time order; whether some records wait for the next pass."""
        merged = self._queued.take(horizon)
        # the last pass of a stopping thread must leave nothing read and undelivered
        read_ahead = not self._stopping and self.alive and (
            threading.get_ident() == getattr(self._worker.thread, "ident", None))
        next_read = time.monotonic() + self.read_ahead_interval
        for record in merged:
            self.records_delivered += 1
            self._deliver(record)
            if read_ahead and time.monotonic() >= next_read:
                self._read_ahead()
                next_read = time.monotonic() + self.read_ahead_interval
        return self._queued.waiting

    def _read_ahead(self) -> None:
        """While slow callbacks deliver a pass, keep reading for the next one: writers waiting
        for room get it, and see the master reading (a stall is the master reading nothing)."""
        for lane in self._segment.busy_lanes():
            reader = self._readers.get(lane)
            if reader is not None:
                records = self._segment.read(lane, self.max_read, JOIN_GAP_NS)
                if records:
                    self._queued.add(reader.feed(records), reader)

    def _reap(self) -> None:
        """Drain and free the lanes whose writers closed them or died."""
        for lane in self._segment.busy_lanes():
            if lane == self._master_lane:
                continue
            info = self._ring.lane_info(lane)
            if info.state == LaneState.ACTIVE:
                if Stamp(info.owner_pid, info.owner_start_us).is_alive():
                    continue
            elif info.state == LaneState.FREE:  # claimed but not yet set up
                if Stamp(info.owner_pid, 0).pid_exists():
                    continue
            reader = self._readers.get(lane) or LaneReader(info.owner_pid, 0, None)
            self._queued.add(reader.feed(self._segment.read(lane, 1 << 62, JOIN_GAP_NS)), reader)
            if info.state != LaneState.CLOSED:  # died: its pump may not have emptied its pipes
                self._queued.add(reader.feed(self._pipes.recover(lane, reader)), reader)
            self._pipes.close(lane)
            self._queued.add(reader.flush(), reader)
            final = self._ring.lane_info(lane)
            for key in COUNTERS:
                self.retired[key] += getattr(final, key)
            self._segment.free(lane)
            self._readers.drop(lane)
            self.lanes_reclaimed += 1


_time_ns = attrgetter("time_ns")
