"""fd-level capture: fds 1 and 2 pointed at pipes, and a pump thread that tees and captures.

This catches what never passes through `sys.stdout`: `os.write(1, ...)`, `os.system`, C and C++
libraries. What does pass through it is captured by the hooks, with its thread, and written to
the saved terminal, not into the pipe (`hooks.py`, KIND_RAW): the lane then has two writers, the
pump and the hooks, whose order `_ring_src/feed.c` keeps ("fd mode's two paths").

Each capturing process (the master, and every forked child) has pipes of its own: the pump
stores what arrives in the process's lane and copies it to the saved original fd (the terminal
keeps its output). A child never writes into its master's pipe, so lines of two
processes cannot interleave mid-line, and a child never blocks on a master that stopped reading.

The pump inside a child is not the only way out of it: the child publishes its pipes' read ends in
its lane, and the master's drain reads what is left in them once the child is dead (killed, or
gone through os._exit before its pump caught up). Opening another process's fds through /proc,
for that and for a spawned child's terminal, is `procfs.py`'s.
"""

from __future__ import annotations

import enum
import fcntl
import mmap
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable

from safe_redirect import fork_parking
from safe_redirect.procfs import append_if_regular_file
from safe_redirect.ring import STREAM_FDS, STREAMS, Producer, PumpEvent, pump

__all__ = ["FdCapture", "FdState", "PipeHandOver", "close_fds", "flush_python_streams"]

#: Pipe capacity: a writer printing flat out does not block while the pump pauses.
_PIPE_BYTES = 1 << 20
#: The most one read of the pump takes (measured: 64 KiB to 1 MiB make no difference that the
#: benchmarks can tell apart; smaller stays in the cache).
_READ_BYTES = 1 << 18
#: After a read of at least _BUSY_READ bytes that emptied the pipe (someone prints flat out) the
#: pump waits this long before the next, so that it wakes, and takes the writer's core, once per
#: batch instead of once per block of the writer's buffer. A single line is never delayed.
_BUSY_READ = 1 << 12
_BATCH_PAUSE = 0.0005
#: While output streams in, the pump comes back to Python this often to read the rank again.
_RANK_REFRESH = 0.1


def _write_all(fd: int, data: bytes) -> None:
    """Tee to the terminal; a terminal that went away is not the writer's problem."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return


class PipeHandOver:
    """How a forked child gives its master the read ends of its pipes before it writes anything:
    over a socket pair the master made at install() and every fork inherits (SCM_RIGHTS). Once
    sent, the read ends are held by the socket's queue and then by the master, whatever becomes
    of the child: one killed right after writing, before its pump read and before the master
    first looked at its lane, loses nothing. Where the sending fails (a spawned process, which
    inherits no socket; a full queue) the master opens the pipes through /proc instead, which
    works only while the child lives (the child waits for that, bounded)."""

    _MESSAGE = struct.Struct("=IiQii")  # lane, pid, start_us, stdout read end, stderr read end

    def __init__(self) -> None:
        self._receive, self._send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._receive.setblocking(False)

    def send(self, lane: int, pid: int, start_us: int, read_ends: tuple[int, int]) -> bool:
        """In the child, right after it published its pipes in `lane`: hand them over. False if
        they could not be sent (the master then opens them through /proc)."""
        fds = [fd for fd in read_ends if fd >= 0]
        try:
            socket.send_fds(self._send, [self._MESSAGE.pack(lane, pid, start_us, *read_ends)],
                            fds, socket.MSG_DONTWAIT)
        except (OSError, ValueError):
            return False
        return True

    def receive(self) -> list[tuple[int, int, int, dict[int, int]]]:
        """In the master: every hand-over waiting, as (lane, pid, start_us, {stream: our fd})."""
        received = []
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self._receive, self._MESSAGE.size, 2,
                                                      socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            except (OSError, ValueError):
                break
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(data) != self._MESSAGE.size:
                close_fds(fds)
                continue
            lane, pid, start_us, *read_ends = self._MESSAGE.unpack(data)
            streams = [stream for stream, fd in enumerate(read_ends) if fd >= 0]
            if len(streams) != len(fds):
                close_fds(fds)
                continue
            for fd in fds:
                os.set_blocking(fd, False)
            received.append((lane, pid, start_us, dict(zip(streams, fds, strict=True))))
        return received

    def close(self) -> None:
        self._receive.close()
        self._send.close()


def close_fds(fds: Iterable[int]) -> None:
    """Close each of `fds` (ours: handed over, never shared)."""
    for fd in fds:
        os.close(fd)


class FdState(enum.Enum):
    """Where an FdCapture is in its life. Each move is made in one place, under its lock (not in
    a forked child, which may have inherited the lock held: `abandon_in_child`)."""

    NEW = "new"  # made; fds 1 and 2 untouched
    OPEN = "open"  # fds 1 and 2 on our pipes, no pump yet (open)
    PUMPING = "pumping"  # the pump captures (run); it steps aside around forks (ParkableThread)
    STOPPING = "stopping"  # fds 1 and 2 put back; the pump captures what the pipes hold (stop)
    TEEING = "teeing"  # all that was written before stop() captured: the pump only tees now,
    # until every writer (a subprocess, say) closed its end
    ENDED = "ended"  # the pump ended at its pipes' EOF before stop(); the saved fds stay open
    CLOSED = "closed"  # saved fds and wake pipe closed, once, by the last of stop() and the pump
    ABANDONED = "abandoned"  # a forked child let go of its parent's capture


_MOVES = {
    FdState.NEW: {FdState.OPEN, FdState.CLOSED},
    FdState.OPEN: {FdState.PUMPING, FdState.CLOSED},
    FdState.PUMPING: {FdState.STOPPING, FdState.ENDED},
    FdState.STOPPING: {FdState.TEEING, FdState.CLOSED},
    FdState.TEEING: {FdState.CLOSED},
    FdState.ENDED: {FdState.CLOSED},
    FdState.CLOSED: set(),
}


class FdCapture:
    """Pipes on fds 1 and 2 of this process and the pump thread that empties them.

    `lane()` runs on the pump thread before each read: it returns the producer to append to (None:
    tee only) and how long the pump may wait for room in a full lane (0: spill what does not
    fit), and may set the thread's rank for what is about to be read. The copy to the terminal
    and into the lane happens in C without the GIL (`ring.pump`): a printing thread is not held
    up by the pump. While the lane is full the pump reads nothing (the writer waits on its pipe)
    and `on_full(producer)` waits as the overflow policy says; what a spilling pump read and the
    lane could not take goes to `on_rest(producer, stream, rest)`."""

    def __init__(self, streams: Iterable[str], lane: Callable[[], tuple[Producer | None, float]],
                 on_full: Callable[[Producer], None],
                 on_rest: Callable[[Producer, int, bytes], None]) -> None:
        self._targets = [(STREAMS.index(name), STREAM_FDS[name]) for name in streams]
        self._lane = lane
        self._on_full = on_full
        self._on_rest = on_rest
        self._buffer = mmap.mmap(-1, _READ_BYTES)  # pages become resident only as reads use them
        self.saved: dict[int, int] = {}  # 1 / 2 -> a copy of what it was (the terminal)
        self.readers: dict[int, tuple[int, int]] = {}  # read end -> (stream, fd it feeds)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._pipes: dict[int, tuple[int, int]] = {}  # 1 / 2 -> (st_dev, st_ino) of our pipe
        # guards the state, the wake pipe's writes and close, and the sync requests
        self._lock = threading.Condition()
        self._state = FdState.NEW
        self._sync_requested = 0
        self._sync_done = 0
        self._open_readers: set[int] | None = None  # the pump's, kept while it is parked
        self._fed: Producer | None = None  # the lane our pipes feed besides the hooks
        self._pump_thread = fork_parking.ParkableThread(
            "safe_redirect-fd-pump", self._pump, self._lock, wake=lambda: self._wake(b"p"),
            stopping=lambda: self._state is not FdState.PUMPING)

    def __repr__(self) -> str:
        return f"<FdCapture {self._state.value} fds={sorted(self.saved)}>"

    @property
    def state(self) -> FdState:
        return self._state

    def _become(self, state: FdState) -> None:
        """Move to `state` (the lock held); a move the lifecycle has not is a bug of ours."""
        if state not in _MOVES[self._state]:
            raise RuntimeError(f"fd capture is {self._state.value}, cannot become {state.value}")
        self._state = state

    def feed(self, producer: Producer | None) -> None:
        """Tell `producer` (this process's lane) our pipes and the saved terminals: from now on
        Python-level writes go to the terminals and the pipes carry the rest
        (`_ring_src/feed.c`)."""
        if producer is not None:
            producer.feed(self.read_ends(), self.saved_fds())
        self._fed = producer

    def tee(self, stream: int, data: bytes) -> None:
        """Write to the saved terminal fd of `stream` (0 stdout, 1 stderr), if it is still open."""
        for _, (number, fd) in self.readers.items():
            if number == stream and fd in self.saved:
                _write_all(self.saved[fd], data)
                return

    def saved_fds(self) -> tuple[int, int]:
        """(stdout, stderr) copies of the terminal, -1 where not captured."""
        return (self.saved.get(1, -1), self.saved.get(2, -1))

    def read_ends(self) -> tuple[int, int]:
        """(stdout, stderr) read ends, -1 where the stream is not captured."""
        by_stream = {stream: r for r, (stream, _) in self.readers.items()}
        return (by_stream.get(0, -1), by_stream.get(1, -1))

    def start(self) -> None:
        self.open()
        self.run()

    def open(self, flush: bool = True) -> None:
        """Point fds 1 and 2 at new pipes; nothing reads them until run(). What the Python
        streams buffer goes to the old fds first; not in a child attaching right after fork (the
        buffers hold its parent's output, and their hooks would attach other sessions then)."""
        with self._lock:
            self._become(FdState.OPEN)
        if flush:
            flush_python_streams()
        for stream, fd in self._targets:
            saved = os.dup(fd)
            append_if_regular_file(saved)
            r, w = os.pipe()
            _enlarge_pipe(r)
            os.set_blocking(r, False)
            os.dup2(w, fd)  # inheritable, as fds 1 and 2 were
            os.close(w)
            info = os.fstat(r)
            self._pipes[fd] = (info.st_dev, info.st_ino)
            self.saved[fd] = saved
            self.readers[r] = (stream, fd)

    def run(self) -> None:
        """Start the pump. Around a fork (see fork_parking) it ends between reads, and a new one
        goes on after it: what is written meanwhile waits in the pipes."""
        with self._lock:
            self._become(FdState.PUMPING)
        self._pump_thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        """The pump thread of the moment (None before run())."""
        return self._pump_thread.thread

    def sync(self, timeout: float | None) -> bool:
        """Return once the pump has captured everything written to fds 1 and 2 before."""
        fork_parking.resume_now()
        if self._state not in (FdState.PUMPING, FdState.ENDED):
            return True
        flush_python_streams()
        with self._lock:
            self._sync_requested += 1
            target = self._sync_requested
        self._wake(b"s")
        with self._lock:
            return self._lock.wait_for(
                lambda: self._sync_done >= target or self._state in _PUMP_GONE, timeout)

    def stop(self, timeout: float | None) -> bool:
        """Put fds 1 and 2 back, capture what the pipes hold, then only tee until every writer
        (a subprocess, say) has closed its end. Returns False if the pump did not answer."""
        if self._state in (FdState.STOPPING, FdState.TEEING, FdState.CLOSED, FdState.ABANDONED):
            return self._state is not FdState.STOPPING  # stopped before
        fork_parking.resume_now()
        fork_parking.unregister(self._pump_thread)
        flush_python_streams()
        for fd, saved in self.saved.items():
            if self._still_ours(fd):  # not if somebody (pytest's capfd, say) took fd 1 since
                os.dup2(saved, fd)
        with self._lock:
            if self._state is FdState.PUMPING:
                self._become(FdState.STOPPING)  # the pump, ending at its pipes' EOF, closes
                self._wake_locked(b"x")  # the wake pipe once it sees this: not before our write
            else:  # NEW, OPEN, ENDED: no pump (any more), nobody else closes
                if self._open_readers is None:  # none ever ran: the read ends are ours too
                    close_fds(self.readers)
                    self._open_readers = set()
                self._close_saved()
            return self._lock.wait_for(lambda: self._state is not FdState.STOPPING, timeout)

    def _wake(self, reason: bytes) -> None:
        """Have the pump come back to Python. Its wake pipe is closed with the saved fds, by
        whichever of stop() and the pump's end comes last (under the lock): never after that,
        and never blocking on a pipe that nobody reads any more (the pump ended at EOF)."""
        with self._lock:
            self._wake_locked(reason)

    def _wake_locked(self, reason: bytes) -> None:
        if self._state not in (FdState.CLOSED, FdState.ABANDONED):
            try:
                os.write(self._wake_w, reason)
            except BlockingIOError:
                pass  # full: the pump has wake-ups enough to read

    def _still_ours(self, fd: int) -> bool:
        try:
            info = os.fstat(fd)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._pipes.get(fd)

    def _close_saved(self) -> None:
        """Once (the lock held): by stop() if the pump has ended, else by the pump as it ends."""
        self._become(FdState.CLOSED)
        if self._fed is not None:
            self._fed.unfeed()  # no hook writes to a saved fd after this
            self._fed = None
        for saved in self.saved.values():
            try:
                os.close(saved)
            except OSError:
                pass
        self.saved = {}
        os.close(self._wake_r)
        os.close(self._wake_w)

    def abandon_in_child(self) -> None:
        """After fork: the pump does not exist here. Point fds 1 and 2 back at the terminal,
        never at the master's pipes, and drop every fd of the master's capture but the saved
        terminal copies (the child's own capture starts from them). The producer it fed is
        the master's: the hooks leave it at their first write here. Takes no lock: the pump
        may have held it at the fork."""
        self._fed = None
        state, self._state = self._state, FdState.ABANDONED
        if state is FdState.CLOSED:
            return  # the saved fds, the wake pipe and the read ends are closed
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        # the read ends the pump closed at their EOF are not ours to close: the numbers may
        # have been taken since
        close_fds(self.readers if self._open_readers is None else self._open_readers)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.readers.clear()
        self.saved.clear()

    def _pump(self) -> None:
        """The pump thread. `pump` (C) does the work without the GIL and comes back here for
        what needs Python: the rank before data that follows an idle spell, sync and stop
        requests, a pipe's end, a lane that stayed full."""
        if self._open_readers is None:
            self._open_readers = set(self.readers)
        open_readers = self._open_readers
        event = 0
        while open_readers:
            event, r = self._pump_once(open_readers, drain_only=False,
                                       fresh=event == PumpEvent.READY)
            if event == PumpEvent.WAKE:
                os.read(self._wake_r, 64)
            elif event == PumpEvent.EOF:  # every writer closed its end (fd 1 itself, say)
                open_readers.discard(r)
                fed = self._fed
                if fed is not None:  # it reads this pipe too: not once the number is free
                    fed.unfeed(self.readers[r][0])
                os.close(r)
            with self._lock:
                requested = self._sync_requested
            if requested != self._sync_done:
                self._drain_pipes(open_readers)
                with self._lock:
                    self._sync_done = requested
                    self._lock.notify_all()
            if self._state is FdState.STOPPING:
                self._drain_pipes(open_readers)  # all that was written before stop(): captured
                with self._lock:
                    self._become(FdState.TEEING)
                    self._lock.notify_all()
            with self._lock:
                if self._pump_thread.leaving_for_fork():
                    return
        with self._lock:
            if self._state is FdState.PUMPING:
                self._become(FdState.ENDED)  # stop() closes the saved fds
            else:
                self._close_saved()  # stop() came first: the saved fds are ours to close
            self._lock.notify_all()

    def _drain_pipes(self, open_readers: set[int]) -> None:
        """Capture everything the pipes hold right now."""
        while self._pump_once(open_readers, drain_only=True, fresh=True)[0] != PumpEvent.DRAINED:
            pass

    def _pump_once(self, open_readers: set[int], drain_only: bool,
                   fresh: bool) -> tuple[int, int]:
        """One call of `pump`, the rank read just before (`fresh`: after it said READY)."""
        capturing = self._state is not FdState.TEEING  # after stop()'s drain: tee only
        producer, wait_room = self._lane() if capturing else (None, 0.0)
        pipes = [(r, self.saved.get(fd, -1), stream) for r, (stream, fd) in self.readers.items()
                 if r in open_readers]
        event, r, rest = pump(pipes, self._wake_r, self._buffer, producer, wait_room,
                              _BATCH_PAUSE, _BUSY_READ, _RANK_REFRESH, drain_only, fresh)
        if event == PumpEvent.FULL and producer is not None:
            self._on_full(producer)
        elif event == PumpEvent.REST and rest is not None and producer is not None:
            self._on_rest(producer, self.readers[r][0], rest)
        return event, r


#: the pump has ended, not for a fork: nothing will serve a sync any more
_PUMP_GONE = (FdState.ENDED, FdState.CLOSED)


def _enlarge_pipe(fd: int) -> None:
    """Ask for a pipe of _PIPE_BYTES (the unprivileged maximum by default); a smaller one works."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (OSError, AttributeError):
        pass


def flush_python_streams() -> None:
    """What sys.stdout and sys.stderr buffer goes to their fds now."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
