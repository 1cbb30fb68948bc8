"""A job's segment on a node: the ranks of one job write into it, the process holding the run reads.

The ranks of `torchrun`, `accelerate launch`, `srun` or N processes started with RANK and
WORLD_SIZE are siblings, not children of one master: none of them owns a segment the others could
attach to, and the one that opens the run (rank 0, usually) does so seconds after the others
print. So a job has a segment of its own on each node, found by name from the launcher's job
identity (`job_key`):

- **Joining** (`JobRing.join`): the first rank creates it (formatted under a temporary name,
  then linked to the job's name: nobody sees a half-made segment), the others map it. Each
  member holds a shared `flock` on it (its forked children share that lock); the last member out
  removes the name; a segment left by a job whose members were all killed is removed at the next
  join. `closed` is never set: members come and go.
- **The reader**: a member that installs a capture (`install()`, a patched wandb run) stamps
  itself into the segment's header as its reader (bytes 72-87: pid and start time, written under
  a POSIX lock of those bytes; unused by the C core) and drains every lane from then on, the
  backlog first. Writers read the stamp when their lane is full: while no live reader is
  stamped they spill at once, counted, so that no rank ever waits for rank 0.

Every rank's lines written before the reader came wait in the lanes (a lane holds about 8,000
lines of 80 bytes); what does not fit is spilled and counted, and has reached the terminal.

Across nodes (the multi-node issue): each node has its segment; on a node without the run, one
member takes the reader's place and forwards its records to the reader on the run's node, whose
drain merges them with its own lanes' by time as it merges lanes (`Drain`'s pass queue).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import time
from collections.abc import Mapping

from safe_redirect.ring import MAX_LANES, Ring, shm_dir
from safe_redirect.spawn import JOB_VAR  # names the job's segment for what a rank starts
from safe_redirect.stamp import Stamp

__all__ = ["JOB_MODE_VAR", "JOB_PREFIX", "JOB_VAR", "JobRing", "job_key", "job_name",
           "sweep_abandoned_jobs"]

#: "fd": the ranks capture fds 1 and 2 too (C code, subprocesses), through pipes; "wrap" default
JOB_MODE_VAR = "SAFE_REDIRECT_JOB_MODE"

#: not "safe_redirect-": an older safe_redirect sweeps those by their creator's stamp, and a job's
#: segment outlives its creator
JOB_PREFIX = "safe-redirect-job-"

_READER = struct.Struct("=QQ")  # pid, start time in microseconds; 0: no reader
_READER_AT = 72  # in the segment header: free bytes 72..127 (see _ring_src/layout.h)
_READER_CHECK = 0.1  # how long a writer trusts its last look at the reader, seconds


def job_key(environ: Mapping[str, str]) -> str | None:
    """What names this process's job on this node, from its launcher's environment; None when
    it is not one rank of several. TORCHELASTIC_RUN_ID is "none" under accelerate and static
    rendezvous: the master's address and port then (unique among live jobs)."""
    world = environ.get("WORLD_SIZE", "").strip()
    if not world.isdigit() or int(world) < 2 or not environ.get("RANK", "").strip().isdigit():
        return None
    run_id = environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        key = f"torchelastic:{run_id}:{environ.get('GROUP_RANK', '')}"
    elif environ.get("SLURM_JOB_ID"):
        key = (f"slurm:{environ['SLURM_JOB_ID']}.{environ.get('SLURM_STEP_ID', '')}:"
               f"{environ.get('SLURM_NODEID', '')}")
    elif environ.get("MASTER_PORT"):
        key = f"rendezvous:{environ.get('MASTER_ADDR', '')}:{environ['MASTER_PORT']}"
    else:
        return None
    return f"{key}:{world}"


def job_name(key: str) -> str:
    """The segment's name in /dev/shm for a job key (one user's jobs never meet another's)."""
    digest = hashlib.sha1(key.encode("utf-8", "replace")).hexdigest()[:20]
    return f"{JOB_PREFIX}{os.getuid()}-{digest}"


def _lock_shared(path: str) -> int | None:
    """A descriptor of `path` holding a shared lock, if `path` still names the file we locked
    (a leaving member may have removed it meanwhile)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _remove_if_unused(path: str) -> bool:
    """Remove `path` if no process holds a lock on it (all members left or were killed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_abandoned_jobs() -> list[str]:
    """Remove the job segments of this machine that no process is a member of; their names."""
    directory = shm_dir()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(JOB_PREFIX)]
    except OSError:
        return []
    return [n for n in names if _remove_if_unused(os.path.join(directory, n))]


class JobRing(Ring):
    """A job's segment, mapped by one member: no master owns it (it is never orphaned, never
    closed); `unlink()` leaves the job and removes the name if this was the last member."""

    _lock_fd = -1
    _reader_seen: tuple[float, bool] = (0.0, False)

    @classmethod
    def join(cls, name: str, lanes: int = 64, lane_bytes: int = 1 << 20) -> JobRing:
        """Map the job's segment, created if no member has yet, as a member."""
        path = os.path.join(shm_dir(), name)
        for _ in range(50):
            _remove_if_unused(path)  # left by a job whose members are all gone
            fd = _lock_shared(path)
            if fd is None:
                fd = cls._create(path, lanes, lane_bytes)
            if fd is not None:
                try:
                    ring = cls.attach(name)
                except BaseException:
                    os.close(fd)
                    raise
                ring._lock_fd = fd
                return ring
            time.sleep(0.001)  # another rank is creating or removing it
        raise OSError(errno.EAGAIN, f"could not join the job segment {path}")

    @classmethod
    def open_to_read(cls, name: str, me: Stamp) -> JobRing | None:
        """The job's segment mapped anew (the membership's mapping stays the writer's) for `me`
        to read, or None if another member reads it."""
        ring = cls.join(name)
        if ring.claim_reader(me):
            return ring
        ring.close()
        ring.unlink()
        return None

    @staticmethod
    def _create(path: str, lanes: int, lane_bytes: int) -> int | None:
        """A new segment under `path`, locked by us; None if another rank linked one first."""
        ring = Ring.create(Stamp.current(), min(lanes, MAX_LANES), lane_bytes)
        try:
            fd = os.open(ring.path, os.O_RDWR | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                os.link(ring.path, path)
            except FileExistsError:
                os.close(fd)
                return None
            return fd
        finally:
            ring.close()
            ring.unlink()  # the temporary name

    def unlink_if_orphaned(self) -> bool:
        return False  # membership decides (see unlink)

    def unlink(self) -> None:
        """Leave the job: the last member out removes the name. Forked children share the
        lock of the member they came from: it holds while any of them lives."""
        fd, self._lock_fd = self._lock_fd, -1
        if fd < 0:
            return
        os.close(fd)
        _remove_if_unused(self.path)

    # -- the reader stamp

    def reader(self) -> Stamp | None:
        """The member that reads now, as stamped (it may have died since)."""
        if self.segment.released:
            return None
        pid, start_us = _READER.unpack_from(self._mapping, _READER_AT)
        return Stamp(pid, start_us) if pid else None

    def reader_alive(self) -> bool:
        """Whether a live member reads; looked at most every 0.1 s (a writer asks at each
        full-lane event). A torn read of the stamp counts as no reader: one write spills."""
        now = time.monotonic()
        seen_at, alive = self._reader_seen
        if now - seen_at < _READER_CHECK:
            return alive
        stamp = self.reader()
        alive = stamp is not None and stamp.is_alive()
        self._reader_seen = (now, alive)
        return alive

    def claim_reader(self, me: Stamp) -> bool:
        """Become the reader, unless a live member already is."""
        if self._lock_fd < 0:
            return False
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, _READER.size, _READER_AT)
        try:
            current = self.reader()
            if current is not None and current != me and current.is_alive():
                return False
            _READER.pack_into(self._mapping, _READER_AT, me.pid, me.start_us)
            self._reader_seen = (0.0, False)
            return True
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, _READER.size, _READER_AT)

    def release_reader(self, me: Stamp) -> None:
        if self._lock_fd < 0 or self.segment.released:
            return
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, _READER.size, _READER_AT)
        try:
            if self.reader() == me:
                _READER.pack_into(self._mapping, _READER_AT, 0, 0)
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, _READER.size, _READER_AT)
