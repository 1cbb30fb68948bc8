"""The master's reader: one thread empties the lanes, rebuilds lines and hands them to the callback.

Callbacks run here and only here, never on a writer's thread: a `print` costs a copy into shared
memory, a slow or failing callback cannot stall or break a writer, and all processes meet at one
ordering point. Lines are rebuilt per lane and per stream: partial writes wait for their newline
(or `\\r`, or a flush, or the writer's exit), UTF-8 split across writes is joined by an incremental
decoder, and invalid bytes become U+FFFD instead of an exception. What it makes, `Record`, lives in
`record.py` (also importable from here, as it used to be).
"""

from __future__ import annotations

import codecs
import heapq
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from operator import attrgetter

from safe_redirect import _ring, fork_parking
from safe_redirect.diagnostics import warn
from safe_redirect.fdcapture import PipeHandOver, close_fds
from safe_redirect.procfs import open_peer_pipe, read_available, unread_bytes
from safe_redirect.record import Interleaver, Record, render_tag  # the first two re-exported
from safe_redirect.ring import STREAMS, Ring
from safe_redirect.stamp import Stamp

__all__ = ["Drain", "Interleaver", "LaneReader", "Record"]

# A partial line longer than this is delivered as it is rather than held without bound.
MAX_PARTIAL_CHARS = 1 << 20
#: Writes of one thread follow each other this closely (ns) to share a Record, whose time is its
#: first line's: a writer that paused longer (say, for its workers) starts a Record of its own, so
#: that the drain can order its later lines after what other processes wrote meanwhile. A writer
#: printing flat out stays in few Records (a pause is longer than a print: ~1-3 µs).
JOIN_GAP_NS = 20_000


def _cut_point(text: str) -> int:
    """Index just past the last line end in `text` (0 if none). A `\\r` at the very end waits:
    the next write may begin with the `\\n` of a `\\r\\n`."""
    end = len(text)
    while True:
        i = max(text.rfind("\n", 0, end), text.rfind("\r", 0, end))
        if i < 0:
            return 0
        if text[i] == "\r" and i == len(text) - 1:
            end = i
            continue
        return i + 1


class _StreamState:
    """One thread's partial line on one stream."""

    __slots__ = ("decoder", "mid_line", "partial", "partial_time", "rank")

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.partial = ""
        self.partial_time = 0
        self.rank = -1  # the writing thread's own rank, if it has one
        self.mid_line = False  # what was delivered last ended inside a line

    def delivered(self, text: str) -> bool:
        """Note that `text` goes out; whether it continues the line delivered before it."""
        continued = self.mid_line
        self.mid_line = not text.endswith(("\n", "\r"))
        return continued


class LaneReader:
    """Rebuilds the lines of one lane's owner from its records."""

    def __init__(self, pid: int, start_us: int, rank: int | None, name: str = "",
                 template: str = "[rank{rank}] ", master: bool = False) -> None:
        self.owner = Stamp(pid, start_us)
        self.rank = rank
        self.name = name
        self._template = template
        self._master = master
        self.tag = "" if master else render_tag(template, rank, pid, name)
        self._streams: dict[tuple[int, int], _StreamState] = {}  # by (stream, thread)
        self.pipes: dict[int, int] = {}  # fd mode: stream -> our read end of the owner's pipe
        #: the rank and the writing thread its records carried last (in fd mode the pump, which
        #: stamps the rank it reads from the environment): what is recovered from its pipes after
        #: its death continues that thread's line and is tagged with that rank
        self.last_thread_rank = -1
        self.last_thread = 0
        #: asked before each feed: the owner may have set its rank and name anew since
        self.refresh: Callable[[], None] | None = None

    def rename(self, rank: int | None, name: str) -> None:
        """The owner's rank and name changed (a child named by a launcher after it claimed its
        lane): lines from now on get the new tag."""
        self.rank, self.name = rank, name
        if not self._master:
            self.tag = render_tag(self._template, rank, self.owner.pid, name)

    def close_pipes(self) -> None:
        for fd in self.pipes.values():
            os.close(fd)
        self.pipes.clear()

    def _record(self, stream: int, text: str, time_ns: int, thread_rank: int = -1,
                continued: bool = False) -> Record:
        """A Record of this owner; a thread with a rank of its own (torch_xla) is tagged by it."""
        name = STREAMS[stream] if stream < len(STREAMS) else f"stream{stream}"
        if thread_rank < 0:
            return Record(name, text, self.tag, self.owner.pid, self.rank, time_ns, continued)
        tag = render_tag(self._template, thread_rank, self.owner.pid, self.name)
        return Record(name, text, tag, self.owner.pid, thread_rank, time_ns, continued)

    def feed(self, records: list[tuple[int, int, int, bytes, int, int]]) -> list[Record]:
        """Whole lines found in `records`; consecutive lines of one stream and origin share a
        Record unless their writer paused longer than JOIN_GAP_NS between them. Lines are rebuilt
        per writing thread: two threads never splice into one line."""
        out: list[Record] = []
        cut_before = False  # a line was cut short (FLAG_GAP): the next text must not join it
        last_time = 0  # when the lines last emitted began
        if self.refresh is not None:
            self.refresh()

        def emit(state: _StreamState, stream: int, text: str, time_ns: int,
                 thread_rank: int) -> None:
            nonlocal cut_before, last_time
            record = self._record(stream, text, time_ns, thread_rank, state.delivered(text))
            last = out[-1] if out else None
            if last and not cut_before and (last.stream, last.tag, last.rank) == (
                    record.stream, record.tag, record.rank) and (
                    0 <= time_ns - last_time <= JOIN_GAP_NS):
                out[-1] = replace(last, text=last.text + text)
            else:
                out.append(record)
            cut_before = False
            last_time = time_ns

        for stream, flags, time_ns, payload, thread, thread_rank in records:
            if thread_rank >= 0:
                self.last_thread_rank = thread_rank
            self.last_thread = thread
            state = self._streams.get((stream, thread))
            if state is None:
                state = self._streams[(stream, thread)] = _StreamState()
            if flags & _ring.FLAG_FLUSH:
                # The flushing thread's partial line only: another thread's may be half written
                # (print(..., flush=True) from rank threads); it waits for its own end.
                text = state.partial + state.decoder.decode(b"", final=True)
                if text:
                    emit(state, stream, text, state.partial_time or time_ns, state.rank)
                state.partial = ""
                continue
            if flags & _ring.FLAG_GAP:
                # The writer spilled the rest of the line it had open (a full lane): that line
                # ends here as it is, in a Record of its own; what follows starts a new line.
                head = state.partial + state.decoder.decode(b"", final=True)
                state.partial = ""
                if head:
                    emit(state, stream, head, state.partial_time or time_ns, state.rank)
                    state.mid_line = False
                    cut_before = True
            text = state.decoder.decode(payload)
            if not text:
                continue
            if not state.partial:
                state.partial_time, state.rank = time_ns, thread_rank
            pending = state.partial + text
            cut = _cut_point(pending)
            if cut:
                emit(state, stream, pending[:cut], state.partial_time, state.rank)
                pending = pending[cut:]
                state.partial_time, state.rank = time_ns, thread_rank
            if len(pending) > MAX_PARTIAL_CHARS:
                emit(state, stream, pending, state.partial_time, state.rank)
                pending = ""
            state.partial = pending
        return out

    def flush(self) -> list[Record]:
        """Deliver partial lines too: the writer flushed, exited, or the master asked for all."""
        out: list[Record] = []
        for (stream, _), state in sorted(self._streams.items()):
            text = state.partial + state.decoder.decode(b"", final=True)
            state.partial = ""
            if text:
                out.append(self._record(stream, text, state.partial_time, state.rank,
                                        state.delivered(text)))
        return out


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
        self._recovered = recovered
        self._pass_end = pass_end  # after each pass: what it delivered can go on as a batch
        self._tag_template = tag_template
        self._master_lane = master_lane
        self._readers: dict[int, LaneReader] = {}
        self._batch: dict[object, list[Record]] = {}  # records of this pass, by lane reader
        self._cond = threading.Condition()
        self._requested = 0  # sync requests made
        self._completed = 0  # sync requests served
        self._stopping = False
        self._parking = False  # a fork is about to happen: end the thread, state kept
        self._left_for_fork = False
        self._next_reap = 0.0
        self._thread: threading.Thread | None = None
        #: called with the ident of every thread started after the first (see resume())
        self.on_restart: Callable[[int], None] = lambda ident: None
        self._lane_misses_seen = 0
        # totals of lanes already freed, so that stats survive lane reuse
        self.retired = {"records": 0, "bytes": 0, "spilled_records": 0, "spilled_bytes": 0,
                        "stalls": 0}
        self.lanes_reclaimed = 0
        self.records_delivered = 0
        self.errors = 0
        #: fd mode: forked children hand their pipes over through it (None: /proc only)
        self.hand_over: PipeHandOver | None = None
        #: pipes handed over before their lane's reader exists: (lane, pid, start) -> {stream: fd}
        self._handed: dict[tuple[int, int, int], dict[int, int]] = {}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> int:
        self._thread = threading.Thread(target=self._run, name="safe_redirect-drain", daemon=True)
        self._thread.start()
        assert self._thread.ident is not None
        fork_parking.register(self)
        return self._thread.ident

    # -- around a fork (see fork_parking): the thread ends between passes and a new one goes on

    def parked_thread(self) -> threading.Thread | None:
        thread = self._thread
        return thread if thread is not None and thread.is_alive() and not self._stopping else None

    def park(self, deadline: float) -> bool:
        thread = self.parked_thread()
        if thread is None:
            return False
        with self._cond:
            self._parking, self._left_for_fork = True, False
        self._segment.wake()
        thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._parking = False
            left = self._left_for_fork  # decided under the lock: it ends, or it goes on
        if left:
            thread.join(1.0)  # it is past its last pass: only the thread's own exit is left
        return left

    def resume(self) -> None:
        self.on_restart(self.start())

    def sync(self, timeout: float | None) -> bool:
        """Deliver everything published so far, partial lines included. False on timeout."""
        fork_parking.resume_now()
        if self._thread is None or threading.get_ident() == self._thread.ident:
            self._pass(final=True)
            self._pass_end(True)
            return True
        with self._cond:
            self._requested += 1
            target = self._requested
        self._segment.wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._completed < target and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._completed >= target

    def stop(self, timeout: float | None) -> bool:
        """A final sync, then the thread ends. Idempotent."""
        if self._thread is None:
            return True
        fork_parking.unregister(self)
        delivered = self.sync(timeout)
        with self._cond:
            self._stopping = True
        self._segment.wake()
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            for reader in self._readers.values():
                reader.close_pipes()
            self._close_handed()
        return delivered and stopped

    def sync_child_pipes(self, timeout: float | None) -> bool:
        """fd mode: what a live child wrote may still sit in its pipe, not yet read by its pump.
        Wait (bounded) until the pump of each child has read what its pipes held at the call (its
        lane's byte count grew by as much, or the pipes were seen empty: a child printing flat
        out does not hold us up), then sync. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: dict[int, tuple[list[int], int, int]] = {}  # lane -> (pipes, owner, count due)
        try:
            for lane in self._segment.busy_lanes():
                info = self._ring.lane_info(lane)
                if lane == self._master_lane or max(info.pipe_fds) < 0:
                    continue
                pipes = [open_peer_pipe(info.owner_pid, fd) for fd in info.pipe_fds]
                ours = [fd for fd in pipes if fd is not None]
                held = sum(map(unread_bytes, ours))
                pending[lane] = (ours, info.owner_pid,
                                 info.bytes + info.spilled_bytes + held if held else -1)
            while True:
                for lane, (ours, owner, due) in list(pending.items()):
                    if self._pump_caught_up(lane, owner, due) or not any(map(unread_bytes, ours)):
                        del pending[lane]
                        for fd in ours:
                            os.close(fd)
                if not pending:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.0005)
        finally:
            for ours, _, _ in pending.values():
                for fd in ours:
                    os.close(fd)
        return self.sync(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _pump_caught_up(self, lane: int, owner: int, due: int) -> bool:
        """The lane's producer has taken in `due` bytes (stored or spilled), or is gone: the
        reaping of a dead child's lane empties its pipes, a closed lane's pump has drained."""
        info = self._ring.lane_info(lane)
        if info.owner_pid != owner or info.state != _ring.LANE_ACTIVE:
            return True
        return info.bytes + info.spilled_bytes >= due

    # -- the thread

    def _run(self) -> None:
        next_reap = self._next_reap  # a thread started after a fork goes on with the schedule
        while True:
            with self._cond:
                requested, stopping = self._requested, self._stopping
                if self._parking and not stopping:
                    self._left_for_fork = True
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

    def _reader(self, lane: int) -> LaneReader | None:
        reader = self._readers.get(lane)
        if reader is not None:
            return reader
        identity = self._segment.identity(lane)  # before the header: a change after it is seen
        info = self._ring.lane_info(lane)
        if info.state == _ring.LANE_FREE:
            return None  # being claimed right now
        rank = None if info.rank < 0 else info.rank
        reader = self._readers[lane] = LaneReader(
            info.owner_pid, info.owner_start_us, rank, info.name.decode("utf-8", "replace"),
            self._tag_template, master=lane == self._master_lane)
        reader.refresh = lambda: self._refresh_identity(lane, reader, identity)
        if max(info.pipe_fds) >= 0 and lane != self._master_lane:
            # fd mode: a second way out of the child, its pipes' read ends: handed over (see
            # PipeHandOver), else opened through /proc (a child that died before we looked had
            # handed them over, if it wrote anything)
            reader.pipes.update(self._handed.pop((lane, info.owner_pid, info.owner_start_us), {}))
            self._receive_pipes()
            expected = sum(fd >= 0 for fd in info.pipe_fds)
            if len(reader.pipes) < expected:
                for stream, fd in enumerate(info.pipe_fds):
                    if stream not in reader.pipes:
                        ours = open_peer_pipe(info.owner_pid, fd)
                        if ours is not None:
                            reader.pipes[stream] = ours
                if len(reader.pipes) < expected:
                    self._receive_pipes()
            self._segment.ack_pipes(lane)  # the child waits (bounded) for this
        return reader

    def _receive_pipes(self) -> None:
        """Take the pipes that children handed over: into their lane's reader, or kept for the
        reader to come; dropped where the reader has that pipe already (opened through /proc
        first) or the lane has another owner by now."""
        if self.hand_over is None:
            return
        for lane, pid, start_us, fds in self.hand_over.receive():
            info = self._ring.lane_info(lane)
            reader = self._readers.get(lane)
            if info.state == _ring.LANE_FREE or (info.owner_pid, info.owner_start_us) != (
                    pid, start_us):
                close_fds(fds.values())
            elif reader is not None:
                for stream, fd in fds.items():
                    if stream in reader.pipes:
                        os.close(fd)
                    else:
                        reader.pipes[stream] = fd
            else:
                close_fds(self._handed.pop((lane, pid, start_us), {}).values())
                self._handed[(lane, pid, start_us)] = fds

    def _close_handed(self) -> None:
        for fds in self._handed.values():
            close_fds(fds.values())
        self._handed.clear()

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

    def _pass(self, final: bool) -> tuple[bool, bool, bool]:
        """Read every lane once: (anything read or still held, a lane gave all a pass takes and
        may hold more, a lane other than the master's had data)."""
        found = more = children = False
        # what was stamped before the sweep began goes out now, merged in time order; a record
        # stamped later waits for the next pass, whose sweep reads every lane after it: a line
        # published before another was stamped is delivered before it, whichever lane was read
        # first (see _deliver_in_order)
        horizon = time.time_ns()
        # one lane with data: take all it holds; several: a bite of each, round and round
        bite = 1 << 62 if final or self._segment.lanes_with_data() < 2 else self.max_read
        for lane in self._segment.busy_lanes():
            reader = self._reader(lane)
            if reader is None:
                continue
            records = self._segment.read(lane, bite, JOIN_GAP_NS)
            if records:
                found = True
                children = children or lane != self._master_lane
                if not final and sum(len(r[3]) for r in records) >= bite:
                    more = True  # this lane may hold more: no pause before the next pass
                self._hand_over(reader.feed(records), reader)
            if final:
                self._hand_over(reader.flush(), reader)
        # final (sync, the last pass): everything read goes; so does all once the thread stops
        held = self._deliver_in_order(None if final or self._stopping else horizon)
        return found or held, more, children

    def _hand_over(self, records: list[Record], source: object) -> None:
        """Queue `records` of one lane (`source`: its reader) for this pass, in their order."""
        if records:
            self._batch.setdefault(source, []).extend(records)

    def _deliver_in_order(self, horizon: int | None) -> bool:
        """Deliver the queued records stamped before `horizon` (all if None) in time_ns order,
        by a stable merge that keeps each lane's own order (per process, stream and thread). The
        rest of a lane, from its first later record on, waits for the next pass. True if any
        record waits."""
        batch, self._batch = self._batch, {}
        ready: list[list[Record]] = []
        for source, records in batch.items():
            cut = len(records)
            if horizon is not None:
                cut = next((i for i, r in enumerate(records) if r.time_ns >= horizon), cut)
                if cut < len(records):
                    self._batch[source] = records[cut:]
            if cut:
                ready.append(records[:cut] if cut < len(records) else records)
        merged = ready[0] if len(ready) == 1 else heapq.merge(*ready, key=_time_ns)
        # the last pass of a stopping thread must leave nothing read and undelivered
        read_ahead = not self._stopping and self.alive and (
            threading.get_ident() == getattr(self._thread, "ident", None))
        next_read = time.monotonic() + self.read_ahead_interval
        for record in merged:
            self.records_delivered += 1
            self._deliver(record)
            if read_ahead and time.monotonic() >= next_read:
                self._read_ahead()
                next_read = time.monotonic() + self.read_ahead_interval
        return bool(self._batch)

    def _read_ahead(self) -> None:
        """While slow callbacks deliver a pass, keep reading for the next one: writers waiting
        for room get it, and see the master reading (a stall is the master reading nothing)."""
        for lane in self._segment.busy_lanes():
            reader = self._reader(lane)
            if reader is not None:
                records = self._segment.read(lane, self.max_read, JOIN_GAP_NS)
                if records:
                    self._hand_over(reader.feed(records), reader)

    def _reap(self) -> None:
        """Drain and free the lanes whose writers closed them or died."""
        for lane in self._segment.busy_lanes():
            if lane == self._master_lane:
                continue
            info = self._ring.lane_info(lane)
            if info.state == _ring.LANE_ACTIVE:
                if Stamp(info.owner_pid, info.owner_start_us).is_alive():
                    continue
            elif info.state == _ring.LANE_FREE:  # claimed but not yet set up
                if Stamp(info.owner_pid, 0).pid_exists():
                    continue
            reader = self._reader(lane) or LaneReader(info.owner_pid, 0, None)
            self._hand_over(reader.feed(self._segment.read(lane, 1 << 62, JOIN_GAP_NS)), reader)
            if info.state != _ring.LANE_CLOSED:  # died: its pump may not have emptied its pipes
                # they continue the lines of the pipes' thread (fd mode's hooks write others)
                thread = self._segment.pipe_thread(lane) or reader.last_thread
                rank = reader.last_thread_rank if thread == reader.last_thread else -1
                left = [(stream, 0, time.time_ns(), read_available(fd), thread, rank)
                        for stream, fd in reader.pipes.items()]
                for stream, _, _, data, _, _ in left:
                    if data:
                        self._recovered(stream, data)  # the terminal never saw these either
                self._hand_over(reader.feed([x for x in left if x[3]]), reader)
            reader.close_pipes()
            self._hand_over(reader.flush(), reader)
            final = self._ring.lane_info(lane)
            for key in self.retired:
                self.retired[key] += getattr(final, key)
            self._segment.free(lane)
            self._readers.pop(lane, None)
            self.lanes_reclaimed += 1


_time_ns = attrgetter("time_ns")
