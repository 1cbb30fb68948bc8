"""`LaneWriter`: how this process's output gets into its lane of the segment.

Every process of a session has one: the master's writes into the lane it claimed at install; a
forked child's claims a lane of its own at its first captured write (wrap mode) or right after the
fork (fd mode, whose pipes must leave the master's at once), and again after each further fork; a
spawned child's claims one at its first write. It holds the stream hooks (`hooks.py`), in fd mode
the pipes of this process and their pump (`fdcapture.py`), the producer of the lane and what a
full lane does (`overflow.py`).

It never calls anything of the master's: whether the reader still reads comes from the session
(`reader_alive`), and a child never waits for its master longer than a bounded moment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from safe_redirect.diagnostics import warn
from safe_redirect.exits import run_before_os_exit
from safe_redirect.fdcapture import FdCapture, PipeHandOver, flush_python_streams
from safe_redirect.hooks import StreamHooks, reaim_in_child
from safe_redirect.overflow import Overflow
from safe_redirect.procfs import reopen_terminal
from safe_redirect.ranks import detect_rank, set_thread_rank
from safe_redirect.ring import Hook, Producer, Ring
from safe_redirect.stamp import Stamp, fork_generation, process_name

__all__ = ["LaneWriter"]

#: a child that finds no free lane asks the master to free the lanes of exited children and
#: tries again, this many times (about 1 s in all) before its output goes to its terminal only
CLAIM_ATTEMPTS = 20


class LaneWriter:
    """This process's lane and what writes into it (the hooks; in fd mode also the pipes)."""

    def __init__(self, ring: Ring, mode: str, streams: Iterable[str], overflow: str,
                 stall_timeout: float, reader_alive: Callable[[], bool],
                 reader_optional: bool = False) -> None:
        self.ring = ring
        self.mode = mode
        self.hooks = StreamHooks(streams, self._on_fork, self._on_full)
        self.overflow = Overflow(overflow, stall_timeout, reader_alive, self._reader_gone,
                                 reader_optional)
        self._reader_optional = reader_optional
        #: a job member whose process installed a capture of its own: it writes into no lane
        #: meanwhile (nor do its forks), that capture's writer does
        self.muted = False
        self.producer: Producer | None = None
        self.fd: FdCapture | None = None  # fd mode: the pipes of this process
        self.hand_over: PipeHandOver | None = None  # fd mode: a forked child's pipes to the master
        self.in_child = False  # a forked or spawned child: the lane is claimed lazily
        self._generation = fork_generation()  # of the process the lane belongs to
        self._attaching: dict[int, int] = {}  # fork generation -> thread claiming a lane
        self._finished = False

    # -- in the master

    def start_in_master(self, lane: int, hand_over: PipeHandOver | None) -> None:
        """Write into `lane` from now on: the hooks, and in fd mode pipes on fds 1 and 2."""
        self.producer = self.ring.segment.producer(lane)
        if self.mode == "fd":
            self.hand_over = hand_over
            self.fd = self._new_fd_capture()
            self.fd.open()
            self.fd.feed(self.producer)
            self.fd.run()
        self.hooks.install(self.producer, terminals=self.mode == "fd")

    def terminal_fds(self) -> tuple[int, int]:
        """fd mode: the master's terminal (saved fds 1 and 2), for spawned children to reopen."""
        return self.fd.saved_fds() if self.fd is not None else (-1, -1)

    def sync(self, timeout: float | None) -> None:
        """fd mode: what the pipes hold so far goes into the lane, and what the streams staged."""
        if self.fd is not None:
            self.fd.sync(timeout)
            self.unstage()

    def tee(self, stream: int, data: bytes) -> None:
        """Bytes the master recovered from a dead child's pipe: the terminal gets them too."""
        if self.fd is not None:
            self.fd.tee(stream, data)

    def unhook(self) -> None:
        """Take the hooks off. fd mode: what the streams buffer reaches the terminal through
        them first (after the hooks it would go into the pipe and be captured twice), and what
        they staged goes into the lane."""
        if self.fd is not None:
            flush_python_streams()
            self.unstage()
        self.hooks.uninstall()

    def unstage(self) -> None:
        if self.fd is not None and self.producer is not None:
            self.producer.unstage()

    def stop_pump(self, timeout: float | None) -> bool:
        """fd mode: the pump reads what is left and puts the master's fds back."""
        return self.fd is None or self.fd.stop(timeout)

    def abandon(self) -> None:
        """The session could not start: undo what was done, bounded."""
        self.hooks.uninstall()
        if self.fd is not None:
            self.fd.stop(timeout=1.0)

    def let_go_of_fds_in_child(self) -> None:
        """Right after a fork: the inherited pipes' fds go back to what they replaced."""
        fd, self.fd = self.fd, None
        if fd is not None:
            fd.abandon_in_child()

    # -- in a child

    def start_attached(self, master_pid: int = 0,
                       terminal_fds: tuple[int, int] = (-1, -1)) -> None:
        """A process that did not make the segment (a spawned child, a job's rank) writes into
        it from its first write on. fd mode (a spawned child): fds 1 and 2 came from the master
        (its pipes): take its terminal back, then pipes of our own (there is no first write to
        wait for)."""
        self.in_child = True
        self._generation = -1  # not a generation: the first write claims a lane
        if self.mode == "fd":
            if master_pid:  # a job's rank has its own terminal on fds 1 and 2
                reopen_terminal(master_pid, terminal_fds, self.hooks.streams)
            self.become_child()
        self.hooks.install(self.ring.segment.placeholder(), terminals=self.mode == "fd")

    def after_fork(self) -> None:
        """Right after os.fork() in the child: stop calling anything of the master's."""
        self._enter_child()
        if self.mode == "fd":
            self.become_child()  # fds 1 and 2 must leave the master's pipes at once

    def _enter_child(self) -> None:
        self.in_child = True
        reaim_in_child()  # already done where Python forked; here for forks made in C

    def become_child(self) -> None:
        """Once per new process: re-aim the hooks and claim a lane. Threads that write while one
        of them claims wait for it (bounded) rather than lose their write."""
        generation = fork_generation()
        if self._generation == generation:
            return
        me = threading.get_ident()
        if self._attaching.get(generation) == me:
            return  # a hook's write from inside the claim: it goes uncaptured
        if self._attaching.setdefault(generation, me) != me:  # atomic under the GIL
            deadline = time.monotonic() + 5.0
            while self._generation != generation and time.monotonic() < deadline:
                time.sleep(0.0005)
            return
        try:
            self._enter_child()
            self.overflow.after_fork()
            if self.mode == "fd":
                self._attach_fd_capture()
            else:
                self.producer = None if self.muted else self._claim_lane()
                self.hooks.set_producer(self.producer)
        finally:
            self._generation = generation
            self._attaching.pop(generation, None)

    def _on_fork(self, hook: Hook) -> None:
        """Called by a hook at the first captured write of a new process."""
        self.become_child()
        producer = self.producer
        if self.mode != "fd" or hook.producer is producer:
            return
        if producer is not None and producer.generation != fork_generation():
            return  # a write from inside the claim (another session's, say): not captured
        # fd mode claimed the lane at fork (for the pipes); the hooks join it at their first
        # write, where a wrap-mode child claims its lane: it takes the rank and name the
        # process has by now, so that both modes tag a process alike
        self.refresh_identity()
        self.hooks.set_producer(producer)

    def refresh_identity(self) -> None:
        """A child's lane takes the rank and multiprocessing name the process has now (they
        were set after the lane was claimed: by a launcher, by multiprocessing's bootstrap)."""
        producer = self.producer
        if not self.in_child or producer is None:
            return
        if producer.generation != fork_generation():
            return  # the lane of the process we were forked from
        rank = detect_rank()
        producer.set_identity(-1 if rank is None else rank,
                              process_name().encode("utf-8", "replace")[:31])

    def _attach_fd_capture(self) -> None:
        """fd mode in a new process: fds 1 and 2 back on the terminal, then pipes of our own,
        published in our lane so that the master can empty them if we die."""
        run_before_os_exit(self.drain_pump_in_child)  # a forked child ends with os._exit()
        self.let_go_of_fds_in_child()
        fd = self.fd = self._new_fd_capture()
        fd.open(flush=False)
        self.producer = self._claim_lane(fd.read_ends())
        fd.feed(self.producer)
        fd.run()
        me = Stamp.current()
        if self.producer is not None and self.hand_over is not None and self.hand_over.send(
                self.producer.lane, me.pid, me.start_us, fd.read_ends()):
            return  # the master holds them from now on, whatever becomes of us
        if self._reader_optional:
            return  # a job's rank: there may be no reader to wait for
        deadline = time.monotonic() + 0.1  # bounded: never block a child on its master
        while self.producer is not None and not self.producer.pipes_acked:
            if time.monotonic() > deadline:
                break
            time.sleep(0.0002)

    def _claim_lane(self, pipe_fds: tuple[int, int] = (-1, -1)) -> Producer | None:
        seg = self.ring.segment
        if seg.released or seg.closed or self.ring.unlink_if_orphaned():
            return None
        me = Stamp.current()
        rank = detect_rank()
        name = process_name().encode("utf-8", "replace")[:31]
        for attempt in range(CLAIM_ATTEMPTS):
            lane = seg.claim(me.pid, me.start_us, -1 if rank is None else rank, name, *pipe_fds,
                             attempt == CLAIM_ATTEMPTS - 1)  # lane_misses counts processes
            if lane >= 0:
                return seg.producer(lane)
            seg.wake()  # the master frees the lanes of exited children when asked
            time.sleep(0.005 * (attempt + 1))
        warn(f"safe_redirect: no free lane for pid {me.pid}: its output goes to its terminal "
             "only (counted in stats().lane_misses; raise install(lanes=...))")
        return None

    def mute(self) -> None:
        self.muted = True
        self.hooks.set_producer(None)

    def unmute(self) -> None:
        self.muted = False
        producer = self.producer
        if producer is not None and producer.generation == fork_generation():
            self.hooks.set_producer(producer)
        else:
            self._generation = -1  # the next write claims a lane
            self.hooks.set_producer(self.ring.segment.placeholder())

    def drain_pump(self) -> None:
        """Capture what this process's pipes hold; multiprocessing children call it at exit."""
        self.sync(timeout=1.0)

    def drain_pump_in_child(self) -> None:
        """At os._exit(): let the pump catch up first, bounded. What a pipe holds when its
        process is gone is only recovered if the master opened it in time."""
        if self.in_child and not self._finished:
            self.drain_pump()

    def close_in_child(self) -> None:
        """A child leaving: its pipes and lane closed; the master drains what is left of the
        lane, then frees it."""
        self.unhook()
        if self.fd is not None:
            self.fd.stop(timeout=1.0)
        if self.producer is not None:
            self.producer.close()

    def finish(self) -> None:
        self._finished = True
        self.producer = None
        if self.hand_over is not None:
            self.hand_over.close()  # a child closes its copy of the sockets
            self.hand_over = None

    # -- fd mode's pump and a full lane (the policy: overflow.py)

    def _new_fd_capture(self) -> FdCapture:
        return FdCapture(self.hooks.streams, self._fd_lane, self.overflow.pump_found_full,
                         self.overflow.append_rest)

    def _fd_lane(self) -> tuple[Producer | None, float]:
        """The fd pump's lane and how long the pump may wait for room in it (in C, without the
        GIL; then the overflow policy applies), asked before each read on the pump thread. The
        lane was claimed at fork or at start-up, before a launcher had set the rank (RANK set by
        the worker itself, the argument of torch.multiprocessing.spawn): a child's pump reads
        it for every chunk. The master's own lines stay untagged."""
        if self.in_child:
            set_thread_rank(detect_rank(thread=False))
        producer = self.producer
        if producer is None or self.muted:
            return None, 0.0  # the pipes' bytes go to the terminal only
        return producer, self.overflow.pump_wait(producer)

    def _on_full(self, hook: Hook, stream: int, rest: bytes) -> None:
        if hook.producer is not None:
            self.overflow.append_rest(hook.producer, stream, rest)

    def _reader_gone(self) -> None:
        """The master stopped reading for good: write into no lane from now on."""
        self.producer = None
        self.hooks.set_producer(None)
