"""The stream hooks: stand-ins for `write` and `flush` of sys.stdout, sys.stderr and their buffers.

Hooks are set on the stream *objects* (as wandb and ipykernel do), not by replacing `sys.stdout`, so
that a logging handler or anything else holding the stream object is captured too. Each hook calls
the writer it replaced and then copies the data into its session's lane (`Hook`, of the C core).

In fd mode one more hook sits at the bottom of each stream, on its `FileIO.write` (the raw file
on fd 1 or 2): it writes to the saved terminal instead of the fd, which is a pipe then, so that
what the hooks above captured with its thread does not come through the pipe a second time.

Every hook of ours on one attribute is kept in a stack, oldest first. In a forked child the stacks
are re-aimed (`reaim_in_child`): each hook calls the hook of ours below it, the lowest one calls the
*plain* method of the stream class, and the top one is put back on the stream. Whatever else the
master had patched in, before or after us (a tracker's writer, say), belongs to the master and is
never called in a child.

A host may also take a hook off behind our back by putting back a writer it saved before we came
(IPython 9 does, at the end of every cell: see `hosts`). `rearm` puts our hooks back on top then,
calling what the host put back; inside IPython it runs before every flush of a hooked stream.
"""

from __future__ import annotations

import enum
import io
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from safe_redirect import hosts
from safe_redirect.ring import STREAM_FDS, STREAMS, Hook, HookKind, Producer
from safe_redirect.stamp import fork_generation, on_fork_in_child

__all__ = ["HookState", "StreamHooks", "reaim_in_child", "rearm"]

OnFork = Callable[[Hook], object]
OnFull = Callable[[Hook, int, bytes], object]

_ABSENT = object()


class HookState(enum.Enum):
    NEW = "new"
    INSTALLED = "installed"
    REMOVED = "removed"


def _instance_attr(obj: Any, name: str) -> Any:
    try:
        return vars(obj).get(name, _ABSENT)
    except TypeError:  # no __dict__
        return _ABSENT


def _plain_method(obj: Any, name: str) -> Callable[..., Any] | None:
    method = getattr(type(obj), name, None)
    if method is None or not hasattr(method, "__get__"):
        return None
    bound: Callable[..., Any] = method.__get__(obj, type(obj))
    return bound


@dataclass(eq=False)
class _Patch:
    """One attribute of one object that we replaced with a hook, and what was there before."""

    owner: Any
    attribute: str
    hook: Hook
    previous: Any  # the value in the instance dict before us, or _ABSENT
    plain: Callable[..., Any]  # the stream class's own method, bound to the owner
    passthrough: bool = False  # its session ended but it could not be taken off the stream
    rearms: bool = False  # a flush that calls `rearm` first (inside IPython)

    def aim(self, target: Callable[..., Any]) -> None:
        """Make the hook call `target` (a flush that re-arms calls `rearm` before it)."""
        self.hook.target = _rearming(target) if self.rearms else target

    @property
    def key(self) -> tuple[int, str]:
        return (id(self.owner), self.attribute)

    def apply(self) -> None:
        setattr(self.owner, self.attribute, self.hook)

    def is_current(self) -> bool:
        return _instance_attr(self.owner, self.attribute) is self.hook

    def restore(self) -> bool:
        """Put back what was there; True if done. If somebody wrapped us since, we stay."""
        if not self.is_current():
            return False
        if self.previous is _ABSENT:
            delattr(self.owner, self.attribute)
        else:
            setattr(self.owner, self.attribute, self.previous)
        return True


# Our hooks per (object, attribute), oldest first. A hook that could not be taken off (somebody
# wrapped it) stays here as a pass-through, so that a child can still re-aim it.
_stacks: dict[tuple[int, str], list[_Patch]] = {}
_reaimed_generation = fork_generation()


def reaim_in_child() -> None:
    """In a new process: our hooks call each other, then the plain method; nothing of the
    master's. Idempotent per process; also called from a hook when C code forked."""
    global _reaimed_generation
    generation = fork_generation()
    if _reaimed_generation == generation:
        return
    _reaimed_generation = generation
    for stack in _stacks.values():
        below: _Patch | None = None  # the nearest hook of a live session
        for patch in stack:
            patch.hook.target = below.hook if below else patch.plain
            patch.previous = below.hook if below else _ABSENT
            patch.hook.skip_thread = 0  # the master's drain thread does not exist here
            patch.hook.host_thread = 0  # nor the kernel's fd echo thread
            if not patch.passthrough:
                below = patch
        if below is not None and not below.is_current():
            try:
                below.apply()  # the newest live hook goes back on top of the stream
            except (AttributeError, TypeError):
                pass


on_fork_in_child(reaim_in_child)


def rearm() -> None:
    """Put our hooks back on top of every attribute where a host put back a writer from before
    them, each calling what is below it as before. A writer somebody set since (which may wrap
    ours) is left alone. Cheap: one dict look-up per hooked attribute when nothing changed."""
    for stack in list(_stacks.values()):
        _rearm_stack(stack)


def _rearm_stack(stack: list[_Patch]) -> None:
    live = [patch for patch in stack if not patch.passthrough]
    if not live or live[-1].is_current():
        return
    bottom = stack[0]
    current = _instance_attr(bottom.owner, bottom.attribute)
    ours = [index for index, patch in enumerate(stack) if current is patch.hook]
    if ours:
        above = stack[ours[0] + 1:]  # one of ours is still on: the ones above it come back
    elif current is _ABSENT or current is bottom.previous or current == bottom.plain:
        above = stack  # the host put back what was there before all of ours
    else:
        return  # somebody else's writer: theirs to keep (it may well call ours)
    below, previous = (bottom.plain if current is _ABSENT else current), current
    for patch in above:
        if patch.passthrough:
            continue
        patch.aim(below)
        patch.previous = previous
        below = previous = patch.hook
    live[-1].apply()


def _rearming(flush: Callable[..., Any]) -> Callable[..., Any]:
    """`flush` that first re-arms: ipykernel flushes after each cell, after IPython put back the
    writers it had found when the cell started."""
    def flush_after_rearm(*args: Any, **kwargs: Any) -> Any:
        rearm()
        return flush(*args, **kwargs)

    return flush_after_rearm


_TARGETS: tuple[tuple[str, str, int], ...] = (
    # (layer, attribute, kind): the text layer first, so its buffer is known to be inside it
    ("text", "write", HookKind.TEXT),
    ("text", "flush", HookKind.FLUSH),
    ("buffer", "write", HookKind.BYTES),
    ("buffer", "flush", HookKind.BUFFER_FLUSH),
)


def _terminal_file(stream: Any, fd: int) -> io.FileIO | None:
    """The raw file at the bottom of `stream` if it writes to `fd` (sys.stdout's, usually)."""
    buffer = getattr(stream, "buffer", None)
    raw = getattr(buffer, "raw", buffer)
    try:
        if isinstance(raw, io.FileIO) and not raw.closed and raw.fileno() == fd:
            return raw
    except (OSError, ValueError):
        pass
    return None


class StreamHooks:
    """All hooks of one session, on the streams it was asked to capture."""

    def __init__(self, streams: Iterable[str], on_fork: OnFork, on_full: OnFull) -> None:
        names = tuple(streams)
        for name in names:
            if name not in STREAMS:
                raise ValueError(f"unknown stream {name!r}: choose from {STREAMS}")
        self.streams = names
        self._on_fork = on_fork
        self._on_full = on_full
        self._patches: list[_Patch] = []
        self.state = HookState.NEW

    def __repr__(self) -> str:
        return (f"<StreamHooks {self.state.value} streams={self.streams} "
                f"patches={len(self._patches)}>")

    def install(self, producer: Producer | None, terminals: bool = False) -> None:
        """Hook sys.stdout / sys.stderr and their buffers; with `terminals` (fd mode) also the
        raw files on fds 1 and 2 under them, first, so that they are the innermost hooks."""
        if self.state is not HookState.NEW:
            raise RuntimeError(f"hooks are {self.state.value}, not new")
        for name in self.streams:
            stream = getattr(sys, name, None)
            if stream is None:
                continue  # pythonw, or a closed console: nothing to capture
            number = STREAMS.index(name)
            echo_thread = hosts.fd_echo_thread(stream)
            raw = _terminal_file(stream, STREAM_FDS[name]) if terminals else None
            if raw is not None:
                self._patch(raw, "write", HookKind.RAW, number, producer)
            first = len(self._patches)
            for layer, attribute, kind in _TARGETS:
                owner = stream if layer == "text" else getattr(stream, "buffer", None)
                if owner is None:
                    continue
                patch = self._patch(owner, attribute, kind, number, producer)
                if patch is None:
                    continue
                # what the kernel echoes from fd 1 / 2 came from a child (or C code): not ours
                patch.hook.host_thread = echo_thread
                if kind == HookKind.FLUSH and hosts.in_ipython():
                    patch.rearms = True
                    patch.aim(patch.hook.target)
            if raw is not None and self._patches[first - 1].hook.kind == HookKind.RAW:
                for patch in self._patches[first:]:  # their bytes reach the terminal through it
                    patch.hook.terminal = True
        self.state = HookState.INSTALLED

    def _patch(self, owner: Any, attribute: str, kind: int, stream: int,
               producer: Producer | None) -> _Patch | None:
        current = getattr(owner, attribute, None)
        plain = _plain_method(owner, attribute)
        if current is None or plain is None:
            return None
        hook = Hook(current, producer, stream, kind, self._on_fork, self._on_full)
        patch = _Patch(owner, attribute, hook, _instance_attr(owner, attribute), plain)
        try:
            patch.apply()
        except (AttributeError, TypeError):
            return None  # an object that takes no attributes: left uncaptured, not replaced
        self._patches.append(patch)
        _stacks.setdefault(patch.key, []).append(patch)
        return patch

    def set_producer(self, producer: Producer | None) -> None:
        for patch in self._patches:
            patch.hook.producer = producer

    def skip_thread(self, ident: int) -> None:
        """Writes made by thread `ident` (the drain thread) go to the terminal only."""
        for patch in self._patches:
            patch.hook.skip_thread = ident

    def uninstall(self) -> None:
        """Restore every stream attribute we replaced; idempotent."""
        if self.state is not HookState.INSTALLED:
            self.state = HookState.REMOVED
            return
        for patch in reversed(self._patches):
            patch.hook.producer = None  # a reference kept elsewhere now just passes through
            try:
                removed = patch.restore()
            except (AttributeError, TypeError):
                removed = False
            stack = _stacks.get(patch.key, [])
            if removed and stack and stack[-1] is patch:
                stack.pop()
                if not stack:
                    del _stacks[patch.key]
            else:
                patch.passthrough = True
        self.state = HookState.REMOVED
