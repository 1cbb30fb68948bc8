"""`install()`: a capture session that composes the stamp, the ring, the hooks and the drain.

Roles of one Session object:
- in the process that installed it (the master) it owns the segment and runs the drain thread;
- in a forked child it is *inherited*: its hooks call the plain writers, write into a lane of the
  child's own, and nothing of the master's (thread, locks, callbacks) is ever touched there.
A fork is noticed by the fork handler (Python forks) or by the hooks' fork generation (any fork),
and on the slow paths (`flush`, `uninstall`) by comparing pids.

What a full lane does is the overflow policy's (`overflow.py`); what must still run when a
process ends through `os._exit()` (a multiprocessing child) is `exits.py`'s.
"""

from __future__ import annotations

import atexit
import enum
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from safe_redirect import _ring
from safe_redirect.arguments import MODES, OVERFLOW_POLICIES, check_install_arguments
from safe_redirect.diagnostics import warn
from safe_redirect.drain import Drain
from safe_redirect.exits import (
    forget_before_os_exit,
    run_at_multiprocessing_child_exit,
    run_before_os_exit,
)
from safe_redirect.fdcapture import FdCapture, PipeHandOver, flush_python_streams
from safe_redirect.hooks import HookState, StreamHooks, reaim_in_child
from safe_redirect.hosts import uncaptured_in_kernel
from safe_redirect.launchers import detect_rank, set_thread_rank, watch_torch_xla
from safe_redirect.overflow import Overflow
from safe_redirect.procfs import reopen_terminal
from safe_redirect.record import Record
from safe_redirect.ring import Producer, Ring, sweep_orphaned_segments
from safe_redirect.spawn import (
    AttachInfo,
    ensure_pth,
    export,
    unexport,
)
from safe_redirect.stamp import (
    Stamp,
    fork_generation,
    on_fork_in_child,
    process_name,
    remove_fork_handler,
)

__all__ = ["MODES", "OVERFLOW_POLICIES", "Session", "Stats", "install", "stats"]

OnOutput = Callable[[Record], object]
#: called after each drain pass that may have delivered records: its records can be handed on as
#: one batch; `final` (a flush) when partial lines were delivered too
OnPassEnd = Callable[[bool], object]


class State(enum.Enum):
    INSTALLED = "installed"  # the master, capturing
    CHILD = "child"  # inherited by a forked child
    UNINSTALLED = "uninstalled"


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


_sessions: list[Session] = []


def _let_go_of_fds_in_child() -> None:
    """Right after fork, before any session's own handler: the fd captures inherited from the
    parent let go of fds 1 and 2 newest first, so that each puts back what the one under it had
    (the oldest: the terminal). Then each session opens pipes of its own oldest first (its
    `_after_fork`), on top of the one under it, as in the parent. Each letting go as its own
    handler came would put a parent's pipe back under a newer session, and leave an older one
    reading a pipe that no longer has a writer."""
    for session in reversed(_sessions):
        fd = session._fd
        if fd is not None and session.state is not State.UNINSTALLED:
            session._fd = None
            fd.abandon_in_child()


on_fork_in_child(_let_go_of_fds_in_child)  # before any session registers its handler


class Session:
    """The handle `install()` returns: `flush()`, `uninstall()`, `stats()`, a context manager."""

    _fd: FdCapture | None  # fd mode: the pipes of this process
    _hand_over: PipeHandOver | None  # fd mode: forked children give us their pipes through it
    _mode: str
    _hooks: StreamHooks
    _overflow: Overflow  # what a full lane does (overflow.py)

    def __init__(self, on_output: OnOutput | None = None, *, mode: str = "wrap",
                 streams: Iterable[str] = ("stdout", "stderr"), tag: str = "[rank{rank}] ",
                 lanes: int = 64, lane_bytes: int = 1 << 20, overflow: str = "block",
                 stall_timeout: float = 2.0, exit_timeout: float = 2.0,
                 on_pass_end: OnPassEnd | None = None) -> None:
        streams = check_install_arguments(on_output, mode, streams, tag, lanes, lane_bytes,
                                          overflow, stall_timeout, exit_timeout)
        if on_pass_end is not None and not callable(on_pass_end):
            raise TypeError(f"on_pass_end must be a callable or None, not {on_pass_end!r}")
        self._configure(mode, streams, overflow, stall_timeout, exit_timeout)
        self._on_output = on_output
        self._on_pass_end = on_pass_end
        watch_torch_xla()
        self._owner = Stamp.current()
        self._rank = detect_rank()
        sweep_orphaned_segments()
        self._ring = Ring.create(self._owner, lanes, lane_bytes)
        self._drain: Drain | None = None
        try:
            lane = self._ring.segment.claim(self._owner.pid, self._owner.start_us,
                                            -1 if self._rank is None else self._rank)
            self._producer: Producer | None = self._ring.segment.producer(lane)
            self._drain = Drain(self._ring, self._deliver, tag, lane, self._tee_recovered,
                                self._pass_end)
            self._drain.on_restart = self._hooks.skip_thread  # a new thread after a fork
            drain_ident = self._drain.start()
            if self._mode == "fd":
                self._hand_over = self._drain.hand_over = PipeHandOver()
                self._fd = FdCapture(self._hooks.streams, self._fd_lane,
                                     self._overflow.pump_found_full,
                                     self._overflow.append_rest)
                self._fd.open()
                self._fd.feed(self._producer)
                self._fd.run()
            self._hooks.install(self._producer, terminals=self._mode == "fd")
            self._hooks.skip_thread(drain_ident)
            self._watch_multiprocessing_children()
        except BaseException:
            self._hooks.uninstall()
            if self._fd is not None:
                self._fd.stop(timeout=1.0)
            if self._drain is not None:
                self._drain.stop(timeout=1.0)
            if self._hand_over is not None:
                self._hand_over.close()
            self._ring.close()
            self._ring.unlink()
            raise
        self._child_generation = fork_generation()
        self.state = State.INSTALLED
        terminal = self._fd.saved_fds() if self._fd is not None else (-1, -1)
        self._attach_info = AttachInfo(self._ring.name, self._owner.pid, self._owner.start_us,
                                       mode, self._hooks.streams, overflow, stall_timeout,
                                       terminal)
        if ensure_pth() is None:
            warn("safe_redirect: no writable site-packages for safe_redirect.pth: spawned "
                 "processes will not be captured")
        self._previous_env = export(self._attach_info)
        self._register()
        note = uncaptured_in_kernel(mode, self._hooks.streams,
                                    self._hooks.state is HookState.INSTALLED)
        if note:
            warn(note)

    @classmethod
    def attach(cls, info: AttachInfo) -> Session:
        """The session of a spawned process: it writes into its master's segment, lazily (the
        first write claims a lane), and runs no callbacks."""
        self = cls.__new__(cls)
        self._configure(info.mode, info.streams, info.overflow, info.stall_timeout, 0.0)
        watch_torch_xla()
        self._on_output = None
        self._ring = Ring.attach(info.segment)
        self._owner = Stamp(info.master_pid, info.master_start_us)
        if self._ring.master != self._owner:
            self._ring.close()
            raise ValueError(f"segment {info.segment} belongs to another master")
        self._rank = None
        self._drain = None
        self._producer = None
        self._attach_info = info
        self._previous_env = None
        self._child_generation = -1  # not a generation: the first write attaches
        self.state = State.CHILD
        if self._mode == "fd":
            # fds 1 and 2 came from the master: its pipes. Take its terminal back, then pipes
            # of our own (there is no first write to wait for).
            reopen_terminal(info.master_pid, info.terminal_fds, self._hooks.streams)
            self._become_child()
        self._hooks.install(self._ring.segment.placeholder(), terminals=self._mode == "fd")
        self._watch_multiprocessing_children()  # a forkserver forks from here
        self._register()
        return self

    def _configure(self, mode: str, streams: Iterable[str], overflow: str, stall_timeout: float,
                   exit_timeout: float) -> None:
        """What a master and an attached child share."""
        self.state = State.UNINSTALLED  # until installed or attached
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, not {overflow!r}")
        self._overflow = Overflow(overflow, stall_timeout, self._reader_alive, self._reader_gone)
        self._exit_timeout = exit_timeout
        self._callback_errors = 0
        self._final_stats: Stats | None = None
        self._attaching: dict[int, int] = {}  # fork generation -> thread attaching a lane
        # uninstall() and stats() of the master from several threads at once (a with-block and
        # atexit, say) must not see the segment released under them; a child never takes it
        self._master_lock = threading.RLock()
        self._hooks = StreamHooks(streams, self._on_fork, self._on_full)
        self._mode = mode
        self._fd = None
        self._hand_over = None

    def _register(self) -> None:
        on_fork_in_child(self._after_fork)
        atexit.register(self._at_exit)
        _sessions.append(self)

    @property
    def is_master(self) -> bool:
        """True in the process that installed this session, while it is installed."""
        return self.state is State.INSTALLED and self._owner.is_me()

    def __repr__(self) -> str:
        return (f"<safe_redirect.Session {self.state.value} owner={self._owner.pid} "
                f"ring={self._ring.name}>")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    # -- master side

    def _deliver(self, record: Record) -> None:
        if self._on_output is None:
            return
        try:
            self._on_output(record)
        except BaseException:  # a KeyboardInterrupt there must not end the drain
            self._callback_errors += 1
            if self._callback_errors == 1:
                warn("safe_redirect: on_output raised (reported once; counted in "
                     "stats().callback_errors):\n" + traceback.format_exc())

    def _pass_end(self, final: bool) -> None:
        if self._on_pass_end is None:
            return
        try:
            self._on_pass_end(final)
        except Exception:
            self._callback_errors += 1
            if self._callback_errors == 1:
                warn("safe_redirect: on_pass_end raised (reported once; counted in "
                     "stats().callback_errors):\n" + traceback.format_exc())

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Deliver everything written so far by this process and live children, partial lines
        included. Returns False if that took longer than `timeout`. In a child: nothing to do."""
        if self._in_child():
            return True
        if self.state is not State.INSTALLED or self._drain is None:
            return True
        if self._fd is not None:
            self._fd.sync(timeout)
            self._unstage()
            delivered = self._drain.sync_child_pipes(timeout)  # live children's pumps too
        else:
            delivered = self._drain.sync(timeout)
        if not delivered:
            warn(f"safe_redirect: flush timed out after {timeout} s")
        return delivered

    def uninstall(self, timeout: float | None = 5.0) -> None:
        """Flush, restore the streams, release the segment. Idempotent; never blocks a child."""
        if self.state is State.UNINSTALLED:
            return
        if self._in_child():
            self._uninstall_in_child()
            return
        with self._master_lock:
            if self.state is State.INSTALLED:  # not uninstalled by another thread meanwhile
                self._uninstall_master(timeout)

    def _uninstall_master(self, timeout: float | None) -> None:
        self._unhook()
        unexport(self._attach_info, self._previous_env)
        if self._fd is not None and not self._fd.stop(timeout):
            warn(f"safe_redirect: the fd pump did not drain within {timeout} s")
        if self._fd is not None and self._drain is not None:
            self._drain.sync_child_pipes(timeout)  # what live children's pumps have not read yet
        # Children still writing detach at their next write, *then* the final drain: whatever
        # a child published before that is delivered; nothing is left unread in a lane.
        self._ring.segment.mark_closed()
        assert self._drain is not None
        delivered = self._drain.stop(timeout)
        self._final_stats = self.stats()
        self._finish()
        if not delivered:
            warn(f"safe_redirect: final delivery timed out after {timeout} s")

    def _unhook(self) -> None:
        """Take the hooks off. fd mode: what the streams buffer reaches the terminal through
        them first (after the hooks it would go into the pipe and be captured twice), and what
        they staged goes into the lane."""
        if self._fd is not None:
            flush_python_streams()
            self._unstage()
        self._hooks.uninstall()

    def _unstage(self) -> None:
        producer = self._producer
        if self._fd is not None and producer is not None:
            producer.unstage()

    def _finish(self) -> None:
        self.state = State.UNINSTALLED
        self._producer = None
        if self._hand_over is not None:
            self._hand_over.close()  # a child closes its copy of the sockets
            self._hand_over = None
        self._ring.close()
        self._ring.unlink()
        remove_fork_handler(self._after_fork)
        atexit.unregister(self._at_exit)
        forget_before_os_exit(self._drain_fd_pump_in_child)
        if self in _sessions:
            _sessions.remove(self)

    def _at_exit(self) -> None:
        if self.state is State.INSTALLED and not self._in_child():
            self._wait_for_children(time.monotonic() + self._exit_timeout)
        self.uninstall(timeout=self._exit_timeout)

    def _wait_for_children(self, deadline: float) -> None:
        """At exit, give children that are still writing a bounded time to finish: wait until no
        child lane has moved for `quiet` seconds (an idle pool worker does not hold us up)."""
        master_lane = self._producer.lane if self._producer else -1
        quiet, last_change, last_tails = 0.1, time.monotonic(), None
        while time.monotonic() < deadline:
            tails = {lane: self._ring.lane_info(lane).tail
                     for lane in self._ring.segment.busy_lanes() if lane != master_lane}
            now = time.monotonic()
            if not tails:
                return
            if tails != last_tails:
                last_tails, last_change = tails, now
            elif now - last_change >= quiet:
                return
            time.sleep(0.01)

    def stats(self) -> Stats:
        """Counters so far; after uninstall(), the totals it ended with."""
        if self.state is not State.INSTALLED or not self._owner.is_me():
            return self._stats()  # a child never takes the lock: a fork may have left it held
        with self._master_lock:
            return self._stats()

    def _stats(self) -> Stats:
        if self.state is State.UNINSTALLED:
            return self._final_stats or Stats()
        seg = self._ring.segment
        totals = dict.fromkeys(("records", "bytes", "spilled_records", "spilled_bytes",
                                "stalls"), 0)
        busy = seg.busy_lanes()
        for lane in busy:
            info = self._ring.lane_info(lane)
            for key in totals:
                totals[key] += getattr(info, key)
        drain = self._drain
        if drain is not None:
            for key in totals:
                totals[key] += drain.retired[key]
        return Stats(delivered=drain.records_delivered if drain else 0,
                     lanes_in_use=len(busy),
                     lanes_reclaimed=drain.lanes_reclaimed if drain else 0,
                     lane_misses=seg.lane_misses, callback_errors=self._callback_errors,
                     **totals)

    # -- child side

    def _in_child(self) -> bool:
        if self.state is State.CHILD:
            return True
        if self.state is State.INSTALLED and not self._owner.is_me():
            self._become_child()  # a fork that skipped Python's fork handlers
            return True
        return False

    def _after_fork(self) -> None:
        """Right after os.fork() in the child: stop calling anything of the master's."""
        if self.state is State.UNINSTALLED:
            return
        self._enter_child_state()
        if self._mode == "fd":
            self._become_child()  # fds 1 and 2 must leave the master's pipes at once

    def _enter_child_state(self) -> None:
        self.state = State.CHILD
        self._drain = None  # its thread does not exist here; its locks may be held
        reaim_in_child()  # already done where Python forked; here for forks made in C

    def _on_fork(self, hook: _ring.Hook) -> None:
        """Called by a hook at the first captured write of a new process."""
        self._become_child()
        producer = self._producer
        if self._mode != "fd" or hook.producer is producer:
            return
        if producer is not None and producer.generation != fork_generation():
            return  # a write from inside the attach (another session's, say): not captured
        # fd mode claimed the lane at fork (for the pipes); the hooks join it at their first
        # write, where a wrap-mode child claims its lane: it takes the rank and name the
        # process has by now, so that both modes tag a process alike
        self.refresh_identity()
        self._hooks.set_producer(producer)

    def refresh_identity(self) -> None:
        """A child's lane takes the rank and multiprocessing name the process has now (they
        were set after the lane was claimed: by a launcher, by multiprocessing's bootstrap)."""
        producer = self._producer
        if self.state is not State.CHILD or producer is None:
            return
        if producer.generation != fork_generation():
            return  # the lane of the process we were forked from
        rank = detect_rank()
        producer.set_identity(-1 if rank is None else rank,
                              process_name().encode("utf-8", "replace")[:31])

    def _become_child(self) -> None:
        """Once per new process: re-aim the hooks and claim a lane. Threads that write while one
        of them attaches wait for it (bounded) rather than lose their write."""
        generation = fork_generation()
        if self._child_generation == generation:
            return
        me = threading.get_ident()
        if self._attaching.get(generation) == me:
            return  # a hook's write from inside the attach: it goes uncaptured
        if self._attaching.setdefault(generation, me) != me:  # atomic under the GIL
            deadline = time.monotonic() + 5.0
            while self._child_generation != generation and time.monotonic() < deadline:
                time.sleep(0.0005)
            return
        try:
            self._enter_child_state()
            self._overflow.after_fork()
            if self._mode == "fd":
                self._attach_fd_capture()
            else:
                self._producer = self._claim_lane()
                self._hooks.set_producer(self._producer)
        finally:
            self._child_generation = generation
            self._attaching.pop(generation, None)

    def _attach_fd_capture(self) -> None:
        """fd mode in a new process: fds 1 and 2 back on the terminal, then pipes of our own,
        published in our lane so that the master can empty them if we die."""
        run_before_os_exit(self._drain_fd_pump_in_child)  # a forked child ends with os._exit()
        if self._fd is not None:
            self._fd.abandon_in_child()
        fd = self._fd = FdCapture(self._hooks.streams, self._fd_lane,
                                     self._overflow.pump_found_full,
                                     self._overflow.append_rest)
        fd.open(flush=False)
        self._producer = self._claim_lane(fd.read_ends())
        fd.feed(self._producer)
        fd.run()
        me = Stamp.current()
        if self._producer is not None and self._hand_over is not None and self._hand_over.send(
                self._producer.lane, me.pid, me.start_us, fd.read_ends()):
            return  # the master holds them from now on, whatever becomes of us
        deadline = time.monotonic() + 0.1  # bounded: never block a child on its master
        while self._producer is not None and not self._producer.pipes_acked:
            if time.monotonic() > deadline:
                break
            time.sleep(0.0002)

    def _tee_recovered(self, stream: int, data: bytes) -> None:
        """Bytes the master recovered from a dead child's pipe: the terminal gets them too."""
        if self._fd is not None:
            self._fd.tee(stream, data)

    def drain_fd_pump(self) -> None:
        """Capture what this process's pipes hold; multiprocessing children call it at exit."""
        if self._fd is not None:
            self._fd.sync(timeout=1.0)
            self._unstage()

    def _drain_fd_pump_in_child(self) -> None:
        """At os._exit(): let the pump catch up first, bounded. What a pipe holds when its
        process is gone is only recovered if the master opened it in time."""
        if self.state is State.CHILD:
            self.drain_fd_pump()

    def _fd_lane(self) -> tuple[Producer | None, float]:
        """The fd pump's lane and how long the pump may wait for room in it (in C, without the
        GIL; then the overflow policy applies), asked before each read on the
        pump thread. The lane was claimed at fork or at start-up, before a launcher had set the
        rank (RANK set by the worker itself, the argument of torch.multiprocessing.spawn): a
        child's pump reads it for every chunk. The master's own lines stay untagged."""
        if self.state is State.CHILD:
            set_thread_rank(detect_rank(thread=False))
        producer = self._producer
        if producer is None:
            return None, 0.0
        return producer, self._overflow.pump_wait(producer)

    def _claim_lane(self, pipe_fds: tuple[int, int] = (-1, -1)) -> Producer | None:
        seg = self._ring.segment
        if seg.released or seg.closed or self._ring.unlink_if_orphaned():
            return None
        me = Stamp.current()
        rank = detect_rank()
        name = process_name().encode("utf-8", "replace")[:31]
        attempts = 20
        for attempt in range(attempts):
            lane = seg.claim(me.pid, me.start_us, -1 if rank is None else rank, name, *pipe_fds,
                             attempt == attempts - 1)  # lane_misses counts processes, not tries
            if lane >= 0:
                return seg.producer(lane)
            seg.wake()  # the master frees the lanes of exited children when asked
            time.sleep(0.005 * (attempt + 1))
        warn(f"safe_redirect: no free lane for pid {me.pid}: its output goes to its terminal "
             "only (counted in stats().lane_misses; raise install(lanes=...))")
        return None

    def _uninstall_in_child(self) -> None:
        self._unhook()
        if self._fd is not None:
            self._fd.stop(timeout=1.0)
        if self._producer is not None:
            self._producer.close()  # the master drains what is left, then frees the lane
        self._unlink_if_master_died()
        self._finish()

    def _unlink_if_master_died(self) -> None:
        """A child leaving: if its master was killed, remove the segment's name, which nobody
        else would (/dev/shm stays clean when the children of a SIGKILLed master exit)."""
        try:
            if not self._ring.segment.released:
                self._ring.unlink_if_orphaned()
        except OSError:
            pass

    def _watch_multiprocessing_children(self) -> None:
        """Each multiprocessing child started from here: its lane takes the name (and torch spawn
        rank) the child has once started; at its exit (os._exit: no atexit) the pump catches up
        and a killed master's segment name is removed."""
        run_at_multiprocessing_child_exit(self, Session._at_multiprocessing_child_exit,
                                          started=Session.refresh_identity)

    def _at_multiprocessing_child_exit(self) -> None:
        """The exit of a multiprocessing child (its finalizers run, atexit does not)."""
        if self.state is State.UNINSTALLED:
            return
        self.drain_fd_pump()
        self._unlink_if_master_died()

    # -- a full lane (the policy: overflow.py)

    def _on_full(self, hook: _ring.Hook, stream: int, rest: bytes) -> None:
        if hook.producer is not None:
            self._overflow.append_rest(hook.producer, stream, rest)

    def _reader_alive(self) -> bool:
        if self.state is State.INSTALLED:
            return self._drain is not None and self._drain.alive
        return not self._ring.unlink_if_orphaned()

    def _reader_gone(self) -> None:
        """The master stopped reading for good: write into no lane from now on."""
        self._producer = None
        self._hooks.set_producer(None)


def install(on_output: OnOutput | None = None, *, mode: str = "wrap",
            streams: Iterable[str] = ("stdout", "stderr"), tag: str = "[rank{rank}] ",
            lanes: int = 64, lane_bytes: int = 1 << 20, overflow: str = "block",
            stall_timeout: float = 2.0, exit_timeout: float = 2.0,
            on_pass_end: OnPassEnd | None = None) -> Session:
    """Capture this process's and every forked child's console output.

    `on_output(record)` runs in this process only, on one background thread, once per `Record`
    (one or more whole lines of one process and stream). The terminal keeps showing everything.
    `on_pass_end(final)` runs on that thread after each pass over the lanes (a batch's end).
    """
    return Session(on_output, mode=mode, streams=streams, tag=tag, lanes=lanes,
                   lane_bytes=lane_bytes, overflow=overflow, stall_timeout=stall_timeout,
                   exit_timeout=exit_timeout, on_pass_end=on_pass_end)


def stats() -> Stats:
    """Counters of the newest active session of this process (zeros when there is none)."""
    for session in reversed(_sessions):
        if session.state is not State.UNINSTALLED:
            return session.stats()
    return Stats()


