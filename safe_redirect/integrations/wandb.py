"""wandb drop-in: fork-safe replacements for the classes of `wandb.sdk.lib.redirect`.

wandb captures a run's console with `StreamRawWrapper` (console="wrap"), `StreamWrapper`
("wrap_emu") and `Redirect` ("redirect"): `Class(src, cbs=(), **kwargs)`, `install()`,
`uninstall()`, each callback `cb(data)`. `patch_wandb()` swaps in classes with that contract that
run on one safe_redirect session per process: every child's lines reach the run's callbacks in the
master, tagged by rank, and no child ever runs a wandb callback.

wandb marks a run finished *before* it stops the console hooks, and the wrap callback refuses
data from then on; so `patch_wandb()` also makes the method every ending of a run goes through
deliver every lane first (see `_ending_method`).

Callbacks run on the drain thread, and follow wandb's `console_capture` contract there: one that
raises anything (a `KeyboardInterrupt` too) is a bug, and every callback of the capture is removed
(see `_SharedCapture._callback_raised`).

What the callbacks receive, terminal emulation per process and batches per drain pass, is
`wandb_terminal`'s.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from safe_redirect.diagnostics import warn
from safe_redirect.integrations.wandb_terminal import (
    EmulatedLog,
    LineScreen,
    RawLog,
    emulated_screen_factory,
    faster_log_writer,
)
from safe_redirect.record import Record
from safe_redirect.session import Session, install

__all__ = [
    "LegacyRedirect", "LegacyStreamWrapper", "Redirect", "StreamRawWrapper", "StreamWrapper",
    "patch_wandb", "unpatch_wandb",
]

_logger = logging.getLogger(__name__)

Callback = Callable[[Any], Any]


class _SharedCapture:
    """The one session of this process for a console mode, shared by a run's stdout and stderr
    redirect objects; records go to the callbacks registered for their stream, after each drain
    pass: raw to wandb's raw callbacks, as a terminal shows them to its emulating classes'."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.callbacks: dict[str, list[Callback]] = {"stdout": [], "stderr": []}
        self.session: Session | None = None
        self.raw_log, self.emulated_log = RawLog(), EmulatedLog(LineScreen)
        self._fds: dict[int, tuple[int, int]] = {}  # see _lost_fds
        self._early: dict[str, list[Record]] = {}  # see add
        self._drain_thread = 0  # the thread _dispatch runs on, once it has run

    def add(self, stream: str, callback: Callback) -> None:
        if self.session is None or not self.session.is_master or self._lost_fds():
            # none yet, or one inherited from a parent: a child that starts a run of its own
            # (rank 0 calling wandb.init) captures for that run, and the parent's callbacks,
            # copied into this process by fork, are not its own
            if self.session is not None and self.session.is_master:
                self.session.uninstall()  # its pipes are no longer on fds 1 and 2 (see below)
            else:
                self.callbacks = {"stdout": [], "stderr": []}
            self.raw_log, self.emulated_log = RawLog(), EmulatedLog(emulated_screen_factory())
            self._drain_thread = 0  # the new session's: known at its first record
            # the drain may deliver before the callbacks are in (this one: below; the other
            # stream's: wandb's next call): what comes first (a child's lines, a job's backlog
            # written before the run began) waits for its stream's first callback
            self._early = {"stdout": [], "stderr": []}
            self.session = install(on_output=self._dispatch, mode=self.mode,
                                   on_pass_end=self._pass_end)
            self._fds = self._fd_identities()
        elif threading.get_ident() != self._drain_thread:
            self.flush()  # what was written before is not the new callback's (as with wandb's)
        self.callbacks[stream].append(callback)

    def remove(self, stream: str, callback: Callback) -> None:
        """Deliver what was written so far, then take the callback off (as wandb's remover,
        whose callbacks ran inside each write, leaves nothing undelivered)."""
        if callback in self.callbacks[stream] and threading.get_ident() != self._drain_thread:
            self.flush()  # not from a callback: the drain thread cannot wait for itself
        try:
            self.callbacks[stream].remove(callback)
        except ValueError:
            pass  # not there (any more: a callback that raised took all of them off)
        if self.session is not None and not any(self.callbacks.values()):
            self.session.uninstall()
            self.session = None

    def flush(self) -> None:
        if self.session is not None:
            self.session.flush(timeout=10.0)

    def _fd_identities(self) -> dict[int, tuple[int, int]]:
        """fd mode: what fds 1 and 2 are right after install (our pipes)."""
        if self.mode != "fd":
            return {}
        out = {}
        for fd in (1, 2):
            try:
                info = os.fstat(fd)
            except OSError:
                continue
            out[fd] = (info.st_dev, info.st_ino)
        return out

    def _lost_fds(self) -> bool:
        """fd mode: somebody put other files on fds 1 / 2 since (pytest's capfd, a wandb
        `Redirect` left installed by an earlier test): a new capture starts from what they are
        now, as a new wandb `Redirect` would."""
        return self._fd_identities() != self._fds

    def _dispatch(self, record: Record) -> None:
        self._drain_thread = threading.get_ident()
        early = self._early.get(record.stream)
        if early is not None:
            if not self.callbacks.get(record.stream):
                if len(early) < _EARLY_RECORDS:
                    early.append(record)
                return
            self._replay(record.stream)
        self._feed(record)

    def _replay(self, stream: str) -> None:
        """The records of `stream` that came before its first callback, on the drain thread."""
        for record in self._early.pop(stream, ()):
            self._feed(record)

    def _feed(self, record: Record) -> None:
        callbacks = self.callbacks.get(record.stream, ())
        if any(not _emulates(callback) for callback in callbacks):
            self.raw_log.feed(record)
        if any(_emulates(callback) for callback in callbacks):
            self.emulated_log.feed(record)

    def _pass_end(self, final: bool) -> None:
        self._drain_thread = threading.get_ident()
        for stream in [name for name in self._early if self.callbacks.get(name)]:
            self._replay(stream)
        for emulated, log in ((False, self.raw_log), (True, self.emulated_log)):
            for stream, text in log.end_pass(final):
                self._hand_on(stream, text, emulated)

    def _hand_on(self, stream: str, text: str, emulated: bool) -> None:
        for callback in list(self.callbacks.get(stream, ())):
            if _emulates(callback) != emulated:
                continue
            try:
                callback(text)
            except BaseException as exc:  # wandb's contract: anything removes all
                self._callback_raised(exc)
                return

    def _callback_raised(self, exc: BaseException) -> None:
        """wandb's `console_capture` contract: a callback that raises anything is buggy, and
        every callback is removed; an `Exception` is logged. wandb re-raises the others out of
        the `write()` so as not to swallow a Ctrl-C that arrived while a callback ran on the
        printing thread. Here callbacks run on the drain thread, where no signal ever arrives (a
        Ctrl-C reaches the main thread untouched), and the `write()` returned long ago: the
        exception is reported on stderr, the drain goes on, and nothing is raised into the
        main thread at some unrelated point (its finish, its exit)."""
        self.callbacks = {"stdout": [], "stderr": []}
        if isinstance(exc, Exception):
            _logger.exception("error in a wandb console callback: all of them removed")
        else:
            warn(f"safe_redirect: a wandb console callback raised {exc!r}: all of them "
                 "removed")


def _emulates(callback: Callback) -> bool:
    """Whether a callback takes the lines a terminal shows (those of wandb's emulating classes)
    rather than raw text."""
    return bool(getattr(getattr(callback, "__self__", None), "emulates", False))


_captures = {mode: _SharedCapture(mode) for mode in ("wrap", "fd")}
#: records of a stream kept for its first callback at most (a stream that never gets one)
_EARLY_RECORDS = 100_000


class _SafeRedirect:
    """wandb's RedirectBase contract on a shared safe_redirect session."""

    mode = "wrap"
    as_bytes = False  # what wandb's callbacks for this class take: str, or UTF-8 bytes
    #: whether wandb ran a terminal emulator before them: they take the lines it shows
    emulates = False

    def __init__(self, src: str, cbs: Iterable[Callback] = (), **_options: Any) -> None:
        if src not in ("stdout", "stderr"):
            raise ValueError(f"src must be 'stdout' or 'stderr', not {src!r}")
        self.src = src
        self.cbs = tuple(faster_log_writer(cb) for cb in cbs) if self.emulates else tuple(cbs)
        self._installed = False

    @property
    def src_stream(self) -> Any:
        return getattr(sys, f"__{self.src}__")

    @property
    def src_fd(self) -> int:
        fd: int = self.src_stream.fileno()
        return fd

    @property
    def src_wrapped_stream(self) -> Any:
        return getattr(sys, self.src)

    def _deliver(self, text: str) -> None:
        if not text:
            return
        data = text.encode("utf-8") if self.as_bytes else text
        for callback in self.cbs:
            callback(data)

    def _on_text(self, text: str) -> None:
        """What the shared capture calls. wandb's classes log an Exception of their callbacks
        and go on; anything else goes on to `_SharedCapture._callback_raised`."""
        try:
            self._deliver(text)
        except Exception:
            _logger.exception("error in a wandb %s callback", self.src)

    def install(self) -> None:
        if self._installed:
            return
        try:
            _captures[self.mode].add(self.src, self._on_text)
        except Exception:
            if self.mode == "fd":
                raise  # wandb's Run._redirect warns "Failed to redirect"
            # wandb's wrap classes: console_capture.CannotCaptureConsoleError, logged and warned
            _logger.exception("failed to install %s hooks", self.src)
            _termwarn(f"Failed to wrap {self.src}. Console logs will not be captured.")
            return
        self._installed = True

    def flush(self, data: str | None = None) -> None:
        if data:
            self._deliver(data)
        _captures[self.mode].flush()

    def uninstall(self) -> None:
        if self._installed:
            _captures[self.mode].remove(self.src, self._on_text)  # delivers what is pending
            self._installed = False


def _termwarn(message: str) -> None:
    try:
        import wandb

        wandb.termwarn(message)
    except Exception:
        warn(f"wandb: WARNING {message}")


class StreamRawWrapper(_SafeRedirect):
    """console="wrap": Python-level writes, raw text to the callbacks."""


class StreamWrapper(_SafeRedirect):
    """console="wrap_emu": wandb ran a terminal emulator over the text: its callbacks take
    whole lines as shown (see wandb_terminal), as UTF-8 bytes."""

    as_bytes = True
    emulates = True


class Redirect(_SafeRedirect):
    """console="redirect": fd-level capture (C extensions, os.system), without a pty. As with
    wandb's, the last one installed for a stream wins: installing takes the previous one off."""

    mode = "fd"
    as_bytes = True
    emulates = True
    _installed_by_stream: ClassVar[dict[str, Redirect]] = {}

    def install(self) -> None:
        current = self._installed_by_stream.get(self.src)
        if current is not None and current is not self:
            current.uninstall()
        self._installed_by_stream[self.src] = self
        super().install()

    def uninstall(self) -> None:
        super().uninstall()
        if self._installed_by_stream.get(self.src) is self:
            del self._installed_by_stream[self.src]


class LegacyStreamWrapper(_SafeRedirect):
    """wandb 0.10.x (the original report's): `StreamWrapper(name, cb, output_writer=None)`,
    `cb(name, data)` — the callback that asserted `can only test a child process` in children."""

    def __init__(self, name: str, cb: Callable[[str, Any], Any] | None = None,
                 output_writer: Any = None) -> None:
        super().__init__(name)
        self.name = name
        self.cb = cb
        self.output_writer = output_writer

    def _deliver(self, text: str) -> None:
        if self.cb is not None:
            self.cb(self.name, text)
        if self.output_writer is not None:
            self.output_writer.write(text.encode("utf-8"))


class LegacyRedirect(_SafeRedirect):
    """wandb 0.10.x: `Redirect(src, dest=Capture(name, cb, output_writer), unbuffered, tee)`."""

    mode = "fd"

    def __init__(self, src: str, dest: Any, unbuffered: bool = False, tee: bool = False) -> None:
        super().__init__(src)
        self.dest = dest

    def _deliver(self, text: str) -> None:
        data = text.encode("utf-8")
        if getattr(self.dest, "_output_writer", None) is not None:
            self.dest._output_writer.write(data)
        if getattr(self.dest, "_cb", None) is not None:
            self.dest._cb(self.dest._name, data)


_REPLACEMENTS = {"StreamRawWrapper": StreamRawWrapper, "StreamWrapper": StreamWrapper,
                 "Redirect": Redirect}
# wandb before 0.11 (no StreamRawWrapper): other constructors, callbacks cb(name, data)
_LEGACY_REPLACEMENTS = {"StreamWrapper": LegacyStreamWrapper, "Redirect": LegacyRedirect}
_originals: dict[str, Any] = {}


def _capture_function(console_capture: Any, stream: str) -> Callable[[Any], Callable[[], None]]:
    """console_capture.capture_stdout / capture_stderr on the shared session: `callback(text,
    written)` runs in the master, on the drain thread; the return value delivers what is pending
    and removes it (idempotent). Raises `CannotCaptureConsoleError` as wandb's does: when
    wandb's own patch failed at import, or ours cannot hook the stream."""

    def capture(callback: Any) -> Callable[[], None]:
        def deliver(text: str) -> None:
            callback(text, len(text))

        getattr(console_capture, "_maybe_raise_patch_exception", lambda: None)()
        try:
            _captures["wrap"].add(stream, deliver)
        except Exception as exc:
            raise console_capture.CannotCaptureConsoleError() from exc
        removed = False

        def remove() -> None:
            nonlocal removed
            if not removed:
                removed = True
                _captures["wrap"].remove(stream, deliver)

        return remove

    return capture


def _take_console_capture_off(console_capture: Any) -> None:
    """wandb's console_capture patches sys.stdout.write / sys.stderr.write at import, for good:
    a lock, a context variable and a callback loop on every write of every process, its children
    included. Put the writer it wrapped back, and serve its capture functions ourselves."""
    for name in ("stdout", "stderr"):
        stream: Any = getattr(sys, name, None)
        patched: Any = getattr(stream, "__dict__", {}).get("write")
        if stream is None or getattr(patched, "__qualname__", "") != (
                "_patch.<locals>.write_with_callbacks"):
            continue
        cells = dict(zip(patched.__code__.co_freevars, patched.__closure__ or (), strict=False))
        wrapped = cells["orig_write"].cell_contents if "orig_write" in cells else None
        _originals[f"console_capture.{name}"] = (stream, patched)
        if getattr(wrapped, "__self__", None) is stream:
            delattr(stream, "write")  # it wrapped the stream's own method
        elif wrapped is not None:
            stream.write = wrapped
    for name in ("capture_stdout", "capture_stderr"):
        _originals[f"console_capture.{name}"] = getattr(console_capture, name)
        setattr(console_capture, name, _capture_function(console_capture,
                                                         name.rsplit("_", 1)[1]))


def _ending_method(run_class: Any) -> str:
    """The method every ending of a run goes through. wandb 0.31: `Run.finish`, `Run.__exit__`
    (the `with` block, an exception or a KeyboardInterrupt in it) and `wandb.finish()` all call
    `Run._finish`, which marks the run finished before it stops the console. wandb 0.10 has only
    `finish`. (An interpreter exit without either: the session's own atexit delivers, before
    wandb's service, registered earlier, is torn down.)"""
    return "_finish" if hasattr(run_class, "_finish") else "finish"


def _flush_before_finish(finish: Callable[..., Any]) -> Callable[..., Any]:
    def finish_after_delivering(run: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(run, "_is_finished", False):
            for capture in _captures.values():
                capture.flush()  # while the run still accepts console data
        return finish(run, *args, **kwargs)

    finish_after_delivering.__wrapped__ = finish  # type: ignore[attr-defined]
    finish_after_delivering.__doc__ = finish.__doc__
    return finish_after_delivering


def _replacements(redirect: Any) -> dict[str, type[_SafeRedirect]]:
    """The classes for the installed wandb's contract (0.10 has no StreamRawWrapper)."""
    return dict(_REPLACEMENTS if hasattr(redirect, "StreamRawWrapper") else _LEGACY_REPLACEMENTS)


def patch_wandb() -> None:
    """Make wandb's console capture fork-safe. Idempotent; `unpatch_wandb()` undoes it."""
    if _originals:
        return
    from wandb.sdk import wandb_run
    from wandb.sdk.lib import redirect

    try:
        from wandb.sdk.lib import console_capture
    except ImportError:  # wandb 0.10
        pass
    else:
        _take_console_capture_off(console_capture)
    for name, replacement in _replacements(redirect).items():
        _originals[name] = getattr(redirect, name)
        setattr(redirect, name, replacement)
    ending = _ending_method(wandb_run.Run)
    _originals[f"Run.{ending}"] = getattr(wandb_run.Run, ending)
    setattr(wandb_run.Run, ending, _flush_before_finish(getattr(wandb_run.Run, ending)))


def unpatch_wandb() -> None:
    """Put wandb's own classes back (runs started since keep the classes they have)."""
    if not _originals:
        return
    from wandb.sdk import wandb_run
    from wandb.sdk.lib import redirect

    ending = _ending_method(wandb_run.Run)
    setattr(wandb_run.Run, ending, _originals.pop(f"Run.{ending}"))
    for name in _replacements(redirect):
        setattr(redirect, name, _originals.pop(name))
    for name in ("capture_stdout", "capture_stderr"):
        if f"console_capture.{name}" in _originals:
            from wandb.sdk.lib import console_capture

            setattr(console_capture, name, _originals.pop(f"console_capture.{name}"))
    for name in ("stdout", "stderr"):
        if f"console_capture.{name}" in _originals:
            stream, patched = _originals.pop(f"console_capture.{name}")
            stream.write = patched
