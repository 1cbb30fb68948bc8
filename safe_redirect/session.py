"""`install()` and the `Session` it returns: a facade over the two roles a process can have.

- `Master` (`master.py`), only in the process that installed the session: the segment, the drain
  thread and the user's callbacks, the export for spawned children, the final delivery.
- `LaneWriter` (`writer.py`), in every process: this process's lane and what writes into it
  (the stream hooks; in fd mode also pipes on fds 1 and 2).

A forked child inherits the Session with both; from the fork on it uses its writer only. A fork
is noticed by the fork handler (Python forks) or by the hooks' fork generation (any fork), and on
the slow paths (`flush`, `uninstall`) by comparing pids. A spawned child builds its Session with
`Session.attach()`: a writer onto its master's segment and no master. The mode (wrap or fd) is
the writer's, chosen once; what must still run when a process ends through `os._exit()` is
`exits.py`'s.
"""

from __future__ import annotations

import atexit
import enum
import os
import time
from collections.abc import Iterable

from safe_redirect.arguments import (
    MODES,
    OVERFLOW_POLICIES,
    check_install_arguments,
    check_streams,
)
from safe_redirect.diagnostics import warn
from safe_redirect.exits import forget_before_os_exit, run_at_multiprocessing_child_exit
from safe_redirect.hooks import HookState
from safe_redirect.hosts import uncaptured_in_kernel
from safe_redirect.job import (
    JOB_MODE_VAR,
    JOB_VAR,
    JobRing,
    job_key,
    job_name,
    sweep_abandoned_jobs,
)
from safe_redirect.master import Master, OnOutput, OnPassEnd, Stats, count
from safe_redirect.ranks import detect_rank, watch_torch_xla
from safe_redirect.ring import Ring
from safe_redirect.spawn import AttachInfo, ensure_pth
from safe_redirect.stamp import Stamp, on_fork_in_child, remove_fork_handler
from safe_redirect.writer import LaneWriter

__all__ = ["MODES", "OVERFLOW_POLICIES", "OnOutput", "OnPassEnd", "Session", "Stats",
           "install", "join_job", "stats"]


class State(enum.Enum):
    INSTALLED = "installed"  # the master, capturing
    CHILD = "child"  # inherited by a forked child, or attached by a spawned one
    UNINSTALLED = "uninstalled"


_sessions: list[Session] = []


def _let_go_of_fds_in_child() -> None:
    """Right after fork, before any session's own handler: the fd captures inherited from the
    parent let go of fds 1 and 2 newest first, so that each puts back what the one under it had
    (the oldest: the terminal). Then each session opens pipes of its own oldest first (its
    `_after_fork`), on top of the one under it, as in the parent. Each letting go as its own
    handler came would put a parent's pipe back under a newer session, and leave an older one
    reading a pipe that no longer has a writer."""
    for session in reversed(_sessions):
        if not session._uninstalled:
            session._writer.let_go_of_fds_in_child()


on_fork_in_child(_let_go_of_fds_in_child)  # before any session registers its handler


class Session:
    """The handle `install()` returns: `flush()`, `uninstall()`, `stats()`, a context manager."""

    _master: Master | None  # in the installing process only
    _writer: LaneWriter
    #: where spawned children attach (exported in their environment)
    attach_info: AttachInfo

    def __init__(self, on_output: OnOutput | None = None, *, mode: str = "wrap",
                 streams: Iterable[str] = ("stdout", "stderr"), tag: str = "[rank{rank}] ",
                 lanes: int = 64, lane_bytes: int = 1 << 20, overflow: str = "block",
                 stall_timeout: float = 2.0, exit_timeout: float = 2.0,
                 on_pass_end: OnPassEnd | None = None) -> None:
        streams = check_install_arguments(on_output, mode, streams, tag, lanes, lane_bytes,
                                          overflow, stall_timeout, exit_timeout)
        if on_pass_end is not None and not callable(on_pass_end):
            raise TypeError(f"on_pass_end must be a callable or None, not {on_pass_end!r}")
        self._uninstalled = True  # until it is installed
        self._exit_timeout = exit_timeout
        watch_torch_xla()
        self._owner = Stamp.current()
        rank = detect_rank()
        # a rank of a job (job.py) reads the job's segment if no other rank does, else captures
        # into a segment of our own; its membership's writer goes on writing for both where it
        # captures what the mode asks (fd takes in wrap), else it writes nothing meanwhile
        self._member = _job_member()
        job_ring = shared = None
        if self._member is not None:
            job_ring = JobRing.open_to_read(self._member._writer.ring.name, self._owner)
        if job_ring is not None:
            if self._member is not None and self._member._writer.mode in ("fd", mode):
                shared = self._member._writer
            master = Master(job_ring, self._owner, rank, on_output, on_pass_end,
                            owns_ring=False, claims_lane=shared is None)
        else:
            master = Master.create(self._owner, rank, lanes, lane_bytes, on_output, on_pass_end)
        self._master = master
        self._owns_writer = shared is None
        writer = self._writer = shared or LaneWriter(master.ring, mode, streams, overflow,
                                                     stall_timeout, self._reader_alive)
        if self._member is not None and self._owns_writer:
            self._member._writer.mute()
        try:
            drain_ident = master.start_drain(tag, writer.mode == "fd", writer.tee,
                                             writer.hooks.skip_thread)
            if self._owns_writer:
                writer.start_in_master(master.lane, master.hand_over)
            writer.hooks.skip_thread(drain_ident)
            self._watch_multiprocessing_children()
        except BaseException:
            if self._owns_writer:
                writer.abandon()
            if isinstance(master.ring, JobRing):
                master.ring.release_reader(self._owner)
            master.abandon()
            self._let_member_write()
            raise
        self._uninstalled = False
        self.attach_info = AttachInfo(master.ring.name, self._owner.pid, self._owner.start_us,
                                      mode, writer.hooks.streams, overflow, stall_timeout,
                                      writer.terminal_fds())
        if master.owns_ring:  # a job's processes join it through JOB_VAR instead
            master.export(self.attach_info)
        self._register()
        note = uncaptured_in_kernel(mode, writer.hooks.streams,
                                    writer.hooks.state is HookState.INSTALLED)
        if note:
            warn(note)

    @classmethod
    def attach(cls, info: AttachInfo) -> Session:
        """The session of a spawned process: it writes into its master's segment, lazily (the
        first write claims a lane), and runs no callbacks."""
        if info.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {info.mode!r}")
        if info.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, "
                             f"not {info.overflow!r}")
        self = cls.__new__(cls)
        self._uninstalled = True
        self._exit_timeout = 0.0
        self._member = None
        watch_torch_xla()
        ring = Ring.attach(info.segment)
        self._owner = Stamp(info.master_pid, info.master_start_us)
        if ring.master != self._owner:
            ring.close()
            raise ValueError(f"segment {info.segment} belongs to another master")
        self._master = None
        self._owns_writer = True
        self.attach_info = info
        self._writer = LaneWriter(ring, info.mode, info.streams, info.overflow,
                                  info.stall_timeout, self._reader_alive)
        self._uninstalled = False
        self._writer.start_attached(info.master_pid, info.terminal_fds)
        self._watch_multiprocessing_children()  # a forkserver forks from here
        self._register()
        return self

    @classmethod
    def join(cls, ring: JobRing, streams: Iterable[str] = ("stdout", "stderr"),
             mode: str = "wrap") -> Session:
        """The membership of a job's rank (`join_job`): it writes into the job's segment from
        its first write on (fd mode: at once), and spills at once while no rank reads."""
        self = cls.__new__(cls)
        self._uninstalled = True
        self._exit_timeout = 0.0
        self._member = None
        watch_torch_xla()
        self._owner = Stamp.current()
        self._master = None
        self._owns_writer = True
        self.attach_info = AttachInfo(ring.name, 0, 0, mode, tuple(streams), "block", 2.0)
        self._writer = LaneWriter(ring, mode, streams, "block", 2.0, self._reader_alive,
                                  reader_optional=True)
        self._uninstalled = False
        self._writer.start_attached()
        self._watch_multiprocessing_children()
        self._register()
        return self


    def _register(self) -> None:
        on_fork_in_child(self._after_fork)
        atexit.register(self._at_exit)
        _sessions.append(self)

    @property
    def state(self) -> State:
        if self._uninstalled:
            return State.UNINSTALLED
        return State.CHILD if self._is_child() else State.INSTALLED

    def _is_child(self) -> bool:
        """Not the installing process: a fork of it, or a process attached to its segment."""
        return self._writer.in_child if self._owns_writer else not self._owner.is_me()

    @property
    def is_master(self) -> bool:
        """True in the process that installed this session, while it is installed."""
        return self.state is State.INSTALLED and self._owner.is_me()

    def __repr__(self) -> str:
        return (f"<safe_redirect.Session {self.state.value} owner={self._owner.pid} "
                f"ring={self._writer.ring.name}>")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Deliver everything written so far by this process and live children, partial lines
        included. Returns False if that took longer than `timeout`. In a child: nothing to do."""
        master = self._master
        if self._in_child() or self._uninstalled or master is None:
            return True
        self._writer.sync(timeout)
        delivered = master.sync(timeout, child_pipes=self._writer.fd is not None)
        if not delivered:
            warn(f"safe_redirect: flush timed out after {timeout} s")
        return delivered

    def uninstall(self, timeout: float | None = 5.0) -> None:
        """Flush, restore the streams, release the segment. Idempotent; never blocks a child."""
        if self._uninstalled:
            return
        if self._in_child():
            self._uninstall_in_child()
            return
        master = self._master
        assert master is not None
        with master.lock:
            if not self._uninstalled:  # not uninstalled by another thread meanwhile
                self._uninstall_master(master, timeout)

    def _uninstall_master(self, master: Master, timeout: float | None) -> None:
        writer = self._writer
        master.unexport()
        if not self._owns_writer:  # a job's membership: it goes on writing
            writer.sync(timeout)
        else:
            writer.unhook()
            if not writer.stop_pump(timeout):
                warn(f"safe_redirect: the fd pump did not drain within {timeout} s")
        if writer.fd is not None:
            master.sync(timeout, child_pipes=True)  # what live children's pumps have not read
        delivered = master.close(timeout)
        self._final_stats = master.stats()
        if isinstance(master.ring, JobRing):  # the job goes on: a later reader frees our lane
            if self._owns_writer and writer.producer is not None:
                writer.producer.close()
            master.ring.release_reader(self._owner)
        if not self._owns_writer:
            writer.hooks.skip_thread(0)  # the drain thread has ended
        self._finish()
        self._let_member_write()
        if not delivered:
            warn(f"safe_redirect: final delivery timed out after {timeout} s")

    def _finish(self) -> None:
        self._uninstalled = True
        ring = self._master.ring if self._master is not None else self._writer.ring
        if self._owns_writer:
            self._writer.finish()
            forget_before_os_exit(self._writer.drain_pump_in_child)
        ring.close()
        ring.unlink()
        remove_fork_handler(self._after_fork)
        atexit.unregister(self._at_exit)
        if self in _sessions:
            _sessions.remove(self)

    def _let_member_write(self) -> None:
        """A job's membership muted for our writer: it writes again."""
        if self._member is not None and self._owns_writer:
            self._member._writer.unmute()

    def _at_exit(self) -> None:
        if self.state is State.INSTALLED and not self._in_child() and self._master is not None:
            self._master.wait_for_children(time.monotonic() + self._exit_timeout)
        self.uninstall(timeout=self._exit_timeout)

    def stats(self) -> Stats:
        """Counters so far; after uninstall(), the totals it ended with."""
        if self._uninstalled:
            return getattr(self, "_final_stats", None) or Stats()
        master = self._master
        if self.state is not State.INSTALLED or master is None or not self._owner.is_me():
            return count(self._writer.ring, None)  # a child: a fork may have left the lock held
        with master.lock:
            return Stats() if self._uninstalled else master.stats()

    # -- a child's side

    def _in_child(self) -> bool:
        if self._uninstalled:
            return False
        if self._is_child():
            return True
        if not self._owner.is_me():
            self._writer.become_child()  # a fork that skipped Python's fork handlers
            return True
        return False

    def _after_fork(self) -> None:
        """Right after os.fork() in the child: stop calling anything of the master's."""
        if not self._uninstalled and self._owns_writer:
            self._writer.after_fork()

    def _uninstall_in_child(self) -> None:
        if self._owns_writer:
            self._writer.close_in_child()
            self._unlink_if_master_died()
        self._finish()

    def _unlink_if_master_died(self) -> None:
        """A child leaving: if its master was killed, remove the segment's name, which nobody
        else would (/dev/shm stays clean when the children of a SIGKILLed master exit)."""
        try:
            if not self._writer.ring.segment.released:
                self._writer.ring.unlink_if_orphaned()
        except OSError:
            pass

    def _reader_alive(self) -> bool:
        """Whether the master still reads: asked by a writer whose lane is full."""
        if self._master is not None and not self._is_child():
            return self._master.reading
        ring = self._writer.ring
        if isinstance(ring, JobRing):
            return ring.reader_alive()
        return not ring.unlink_if_orphaned()

    def _watch_multiprocessing_children(self) -> None:
        """Each multiprocessing child started from here: its lane takes the name (and torch spawn
        rank) the child has once started; at its exit (os._exit: no atexit) the pump catches up
        and a killed master's segment name is removed."""
        run_at_multiprocessing_child_exit(self, Session._at_multiprocessing_child_exit,
                                          started=Session._refresh_identity)

    def _refresh_identity(self) -> None:
        """A multiprocessing child has its name (and torch spawn rank) now: its lane takes it."""
        if not self._uninstalled:
            self._writer.refresh_identity()

    def _at_multiprocessing_child_exit(self) -> None:
        """The exit of a multiprocessing child (its finalizers run, atexit does not)."""
        if self._uninstalled:
            return
        self._writer.drain_pump()
        self._unlink_if_master_died()


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


def _job_member() -> Session | None:
    """This process's membership of a job (`join_job`), if it has one."""
    for session in reversed(_sessions):
        if (not session._uninstalled and session._master is None
                and isinstance(session._writer.ring, JobRing)):
            return session
    return None


def join_job(streams: Iterable[str] = ("stdout", "stderr"), mode: str | None = None,
             ) -> Session | None:
    """Make this process a member of its job's segment on this node: every rank calls it (the
    `.pth` does where SAFE_REDIRECT_PATCH is set under a launcher), and the rank that then
    calls `install()` (a patched wandb run on rank 0) receives every rank's lines, tagged.

    The job is named by the launcher's environment (`job.job_key`): None when this process is
    not one rank of several. The processes this one starts join the same job. `mode`: "wrap"
    (Python-level writes), or "fd" (also what C code and subprocesses write to fds 1 and 2,
    through pipes); by default SAFE_REDIRECT_JOB_MODE, else "wrap"."""
    streams = check_streams(streams)
    if mode is None:
        mode = os.environ.get(JOB_MODE_VAR) or "wrap"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    member = _job_member()
    name = os.environ.get(JOB_VAR)
    if not name:
        key = job_key(os.environ)
        if key is None:
            return None
        name = job_name(key)
    if member is not None and member._writer.ring.name == name:
        return member
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    lanes = max(64, 16 * int(local_ranks)) if local_ranks.isdigit() else 64
    sweep_abandoned_jobs()
    ring = JobRing.join(name, lanes)
    os.environ[JOB_VAR] = name  # what this rank starts joins too
    os.environ[JOB_MODE_VAR] = mode
    ensure_pth()
    return Session.join(ring, streams, mode)


def stats() -> Stats:
    """Counters of the newest active session of this process (zeros when there is none)."""
    for session in reversed(_sessions):
        if not session._uninstalled:
            return session.stats()
    return Stats()
