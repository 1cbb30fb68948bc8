"""fd mode, in the master: a child's pipes, the second way out of it besides its pump.

A unit because one question runs through it: what a child wrote to fd 1 / 2 that its pump has
not stored in its lane yet. Its pump may never do so (the child was killed, or left through
os._exit first), so the master holds read ends of every child's pipes: handed over at fork
(`fdcapture.PipeHandOver`), else opened through /proc (`procfs.py`). When the drain reaps a dead
child's lane, what is left in them is read here, sent to the terminal (which never saw it
either) and fed to the lane's reader as records of the pipes' thread. A flush waits here
(bounded) for live children's pumps to take in what their pipes hold. The child publishes its
pipes in its lane and waits (bounded) for `ack_pipes`; the drain (`drain.py`) calls in here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from safe_redirect.fdcapture import PipeHandOver, close_fds
from safe_redirect.lanereader import LaneReader
from safe_redirect.procfs import open_peer_pipe, read_available, unread_bytes
from safe_redirect.ring import LaneInfo, LaneRecord, LaneState, Ring

__all__ = ["ChildPipes"]


class ChildPipes:
    """The read ends of the children's pipes that the master holds, by lane."""

    def __init__(self, ring: Ring, master_lane: int,
                 recovered: Callable[[int, bytes], None]) -> None:
        self._ring = ring
        self._segment = ring.segment
        self._master_lane = master_lane
        self._recovered = recovered  # (stream, bytes) read from a dead child's pipe
        #: forked children hand their pipes over through it (None: /proc only)
        self.hand_over: PipeHandOver | None = None
        #: the lanes the drain has a reader for: stream -> our read end of the owner's pipe
        self._open: dict[int, dict[int, int]] = {}
        #: pipes handed over before their lane's reader exists: (lane, pid, start) -> {stream: fd}
        self._handed: dict[tuple[int, int, int], dict[int, int]] = {}

    def open(self, lane: int, info: LaneInfo) -> None:
        """The drain made a reader for `lane` (owner and pipes as in `info`): take read ends of
        the owner's pipes, handed over, else opened through /proc (a child that died before we
        looked had handed them over, if it wrote anything), and tell the child."""
        pipes = self._open[lane] = {}
        if max(info.pipe_fds) < 0 or lane == self._master_lane:
            return
        pipes.update(self._handed.pop((lane, info.owner_pid, info.owner_start_us), {}))
        self.receive()
        expected = sum(fd >= 0 for fd in info.pipe_fds)
        if len(pipes) < expected:
            for stream, fd in enumerate(info.pipe_fds):
                if stream not in pipes:
                    ours = open_peer_pipe(info.owner_pid, fd)
                    if ours is not None:
                        pipes[stream] = ours
            if len(pipes) < expected:
                self.receive()
        self._segment.ack_pipes(lane)  # the child waits (bounded) for this

    def receive(self) -> None:
        """Take the pipes that children handed over: into their lane's, or kept for the reader
        to come; dropped where the lane has that pipe already (opened through /proc first) or
        another owner by now."""
        if self.hand_over is None:
            return
        for lane, pid, start_us, fds in self.hand_over.receive():
            info = self._ring.lane_info(lane)
            pipes = self._open.get(lane)
            if info.state == LaneState.FREE or (info.owner_pid, info.owner_start_us) != (
                    pid, start_us):
                close_fds(fds.values())
            elif pipes is not None:
                for stream, fd in fds.items():
                    if stream in pipes:
                        os.close(fd)
                    else:
                        pipes[stream] = fd
            else:
                close_fds(self._handed.pop((lane, pid, start_us), {}).values())
                self._handed[(lane, pid, start_us)] = fds

    def recover(self, lane: int, reader: LaneReader) -> list[LaneRecord]:
        """The owner of `lane` died: what its pipes still hold, sent to the terminal too, as
        records that continue the lines of the pipes' thread (fd mode's hooks write others)."""
        pipes = self._open.get(lane, {})
        thread = self._segment.pipe_thread(lane) or reader.last_thread
        rank = reader.last_thread_rank if thread == reader.last_thread else -1
        left: list[LaneRecord] = []
        for stream, fd in pipes.items():
            data = read_available(fd)
            if data:
                self._recovered(stream, data)  # the terminal never saw these either
                left.append((stream, 0, time.time_ns(), data, thread, rank))
        return left

    def close(self, lane: int) -> None:
        """The drain freed `lane`: its pipes are of no more use."""
        close_fds(self._open.pop(lane, {}).values())

    def close_all(self) -> None:
        """The drain stopped."""
        for pipes in self._open.values():
            close_fds(pipes.values())
            pipes.clear()
        for fds in self._handed.values():
            close_fds(fds.values())
        self._handed.clear()

    def wait_for_pumps(self, deadline: float | None) -> bool:
        """What a live child wrote may still sit in its pipe, not yet read by its pump. Wait
        until the pump of each child has read what its pipes held at the call (its lane's byte
        count grew by as much, or the pipes were seen empty: a child printing flat out does not
        hold us up). False at `deadline` (None: no limit)."""
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
                        close_fds(ours)
                if not pending:
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.0005)
        finally:
            for ours, _, _ in pending.values():
                close_fds(ours)

    def _pump_caught_up(self, lane: int, owner: int, due: int) -> bool:
        """The lane's producer has taken in `due` bytes (stored or spilled), or is gone: the
        reaping of a dead child's lane empties its pipes, a closed lane's pump has drained."""
        info = self._ring.lane_info(lane)
        if info.owner_pid != owner or info.state != LaneState.ACTIVE:
            return True
        return info.bytes + info.spilled_bytes >= due
