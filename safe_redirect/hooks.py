"""The stream hooks: stand-ins for `write` and `flush` of sys.stdout, sys.stderr and their buffers.

Hooks are set on the stream *objects* (as wandb and ipykernel do), not by replacing `sys.stdout`, so
that a logging handler or anything else holding the stream object is captured too. Each hook calls
the writer it replaced and then copies the data into this process's lane (`_ring.Hook`).

In a forked child the inherited hooks are re-aimed: they call the *plain* writer of the stream class
(whatever the master had patched in before or after us is dropped: it belongs to the master) and
write into a lane of the child's own.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from safe_redirect import _ring
from safe_redirect.ring import STREAMS, Producer

__all__ = ["HookState", "StreamHooks"]

OnFork = Callable[[_ring.Hook], object]
OnFull = Callable[[_ring.Hook, int, bytes], object]


class HookState(enum.Enum):
    NEW = "new"
    INSTALLED = "installed"
    REMOVED = "removed"


@dataclass
class _Patch:
    """One attribute of one object that we replaced with a hook, and what was there before."""

    owner: Any
    attribute: str
    hook: _ring.Hook
    previous: Any  # the value in the instance dict before us, or _ABSENT
    plain: Callable[..., Any]  # the stream class's own method, bound to the owner

    def apply(self) -> None:
        setattr(self.owner, self.attribute, self.hook)

    def is_current(self) -> bool:
        return _instance_attr(self.owner, self.attribute) is self.hook

    def restore(self) -> None:
        """Put back what was there; if somebody wrapped us since, stay as a pass-through."""
        if not self.is_current():
            return
        if self.previous is _ABSENT:
            delattr(self.owner, self.attribute)
        else:
            setattr(self.owner, self.attribute, self.previous)


_ABSENT = object()


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


_TARGETS: tuple[tuple[str, str, int], ...] = (
    # (layer, attribute, kind): the text layer first, so its buffer is known to be inside it
    ("text", "write", _ring.KIND_TEXT),
    ("text", "flush", _ring.KIND_FLUSH),
    ("buffer", "write", _ring.KIND_BYTES),
    ("buffer", "flush", _ring.KIND_FLUSH),
)


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

    def install(self, producer: Producer | None) -> None:
        if self.state is not HookState.NEW:
            raise RuntimeError(f"hooks are {self.state.value}, not new")
        for name in self.streams:
            stream = getattr(sys, name, None)
            if stream is None:
                continue  # pythonw, or a closed console: nothing to capture
            number = STREAMS.index(name)
            for layer, attribute, kind in _TARGETS:
                owner = stream if layer == "text" else getattr(stream, "buffer", None)
                if owner is None:
                    continue
                self._patch(owner, attribute, kind, number, producer)
        self.state = HookState.INSTALLED

    def _patch(self, owner: Any, attribute: str, kind: int, stream: int,
               producer: Producer | None) -> None:
        current = getattr(owner, attribute, None)
        plain = _plain_method(owner, attribute)
        if current is None or plain is None:
            return
        hook = _ring.Hook(current, producer, stream, kind, self._on_fork, self._on_full)
        patch = _Patch(owner, attribute, hook, _instance_attr(owner, attribute), plain)
        try:
            patch.apply()
        except (AttributeError, TypeError):
            return  # an object that takes no attributes: left uncaptured rather than replaced
        self._patches.append(patch)

    def set_producer(self, producer: Producer | None) -> None:
        for patch in self._patches:
            patch.hook.producer = producer

    def skip_thread(self, ident: int) -> None:
        """Writes made by thread `ident` (the drain thread) go to the terminal only."""
        for patch in self._patches:
            patch.hook.skip_thread = ident

    def enter_child(self) -> None:
        """In a forked child: call the plain writers and put our hooks back on top. Idempotent."""
        if self.state is not HookState.INSTALLED:
            return
        for patch in self._patches:
            patch.hook.target = patch.plain
            patch.hook.skip_thread = 0
            patch.previous = _ABSENT  # what the master had there is the master's, not ours
            if not patch.is_current():
                try:
                    patch.apply()
                except (AttributeError, TypeError):
                    pass

    def uninstall(self) -> None:
        """Restore every stream attribute we replaced; idempotent."""
        if self.state is not HookState.INSTALLED:
            self.state = HookState.REMOVED
            return
        for patch in reversed(self._patches):
            try:
                patch.restore()
            except (AttributeError, TypeError):
                pass
            patch.hook.producer = None  # a reference kept elsewhere now just passes through
        self.state = HookState.REMOVED
