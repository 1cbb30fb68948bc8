"""What a writer does when its lane is full: the overflow policy.

A lane is full when the master reads slower than this process writes. Under "block" (the
default) the writer waits for room for as long as the master keeps reading anything at all, and
spills once the master has read nothing for `stall_timeout` seconds or is gone; under "spill" it
never waits. Spilling loses nothing the user sees: the bytes already reached the terminal, the lane
just does not get them; they are counted in the lane (`stats().spilled_*`) and said once per
process. After a stall the writer spills at once until the master reads again, so that a stuck
master costs a printing process one `stall_timeout`, not one per write.

The same policy serves both ways into a lane: a write hook (`on_full`, called by the C hook with
what did not fit) and fd mode's pump (`pump_wait`, `pump_found_full`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from safe_redirect.diagnostics import warn
from safe_redirect.ring import REC_HEADER, Producer

__all__ = ["Overflow"]

#: fd mode: how long the pump waits in C for room in a full lane before `append_rest` (the
#: policy, in Python) takes over. The drain frees room within a pass, well below this.
PUMP_WAIT_ROOM = 0.05


class Overflow:
    """The overflow policy of one process's lane.

    `reader_alive()` says whether the master still reads (asked every 0.1 s while waiting);
    `reader_gone()` is called once it is not: the process stops writing into the lane.
    """

    def __init__(self, policy: str, stall_timeout: float, reader_alive: Callable[[], bool],
                 reader_gone: Callable[[], None], reader_optional: bool = False) -> None:
        self.policy = policy
        self.stall_timeout = stall_timeout
        self._reader_alive = reader_alive
        self._reader_gone = reader_gone
        # a job's lane (job.py): a reader comes and goes; while there is none, spill at once
        self._reader_optional = reader_optional
        self._stalled_progress: int | None = None  # reader progress when we last spilled (stall)
        self._spill_reported = False

    def after_fork(self) -> None:
        """A new process: a stall its parent saw is not its own."""
        self._stalled_progress = None

    def _spills_at_once(self, producer: Producer) -> bool:
        return (self.policy == "spill" or self._stalled_progress == producer.progress
                or (self._reader_optional and not self._reader_alive()))

    def append_rest(self, producer: Producer, stream: int, rest: bytes) -> None:
        """What did not fit: wait for room as the policy says, else spill it."""
        if self._spills_at_once(producer):
            self._spill(producer, stream, rest)
            return
        producer.count(0, 0, 1)

        def appended(room: bool) -> bool:
            nonlocal rest
            written = producer.append(stream, 0, rest)
            rest = b"" if written < 0 else rest[written:]  # < 0: the master uninstalled
            return not rest

        if not self._wait_for_room(producer, len(rest) + REC_HEADER, appended):
            self._spill(producer, stream, rest)

    def pump_wait(self, producer: Producer) -> float:
        """How long fd mode's pump may wait in C for room in a full lane (0: spill at once)."""
        return 0.0 if self._spills_at_once(producer) else PUMP_WAIT_ROOM

    def pump_found_full(self, producer: Producer) -> None:
        """The block policy, fd mode: the pump found the lane full for PUMP_WAIT_ROOM and read
        nothing (the writer waits on its pipe). Wait as a hook's writer waits; after a stall the
        pump spills (see `pump_wait`)."""
        def room_or_gone(room: bool) -> bool:
            return room or not producer.live  # not live: the master uninstalled

        if not self._wait_for_room(producer, REC_HEADER + (1 << 12), room_or_gone):
            self._stalled_progress = producer.progress

    def _wait_for_room(self, producer: Producer, need: int,
                       done: Callable[[bool], bool]) -> bool:
        """Sleep on the lane until `done(room there)`, asked after each wake-up, says the write
        went through, for as long as the master keeps reading. False once it has read nothing
        for stall_timeout, or is gone: the caller spills. A stall is the master reading nothing
        at all, not just nothing of this lane: under load one pass over many full lanes can take
        longer than stall_timeout."""
        now = time.monotonic()
        deadline, next_check = now + self.stall_timeout, now + 0.1
        progress = producer.progress
        while True:
            # sleeps until the drain frees room (it rings the lane's futex), 0.1 s at most
            if done(producer.wait_space(need, 0.1)):
                self._stalled_progress = None
                return True
            now = time.monotonic()
            if producer.progress != progress:
                progress, deadline = producer.progress, now + self.stall_timeout
            elif now >= deadline:
                return False
            if now >= next_check:
                next_check = now + 0.1
                if not self._reader_alive():
                    if not self._reader_optional:
                        self._reader_gone()
                    return False

    def _spill(self, producer: Producer, stream: int, rest: bytes) -> None:
        """The bytes already went to the terminal; count them, and say so once. Lines stay whole
        in the lane (the producer sees to it): a line spilled in part is spilled to its end, and
        a line whose head is in the lane is cut there, never joined with the next one."""
        producer.count(1, len(rest), 0)
        producer.spilled(stream, rest.endswith((b"\n", b"\r")))
        self._stalled_progress = producer.progress
        if not self._spill_reported:
            self._spill_reported = True
            warn(f"safe_redirect: pid {os.getpid()}: lane full and the master is not reading; "
                 "output goes to the terminal only until it reads again (see "
                 "stats().spilled_bytes)")
