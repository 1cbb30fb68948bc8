"""What wandb's console callbacks receive from many processes: one terminal per writer, batches
per drain pass.

wandb's "wrap_emu" and "redirect" classes run a `TerminalEmulator` over a process's stream and
hand their callbacks the lines it shows (cursor movement, erasing and `\\r` redraws resolved,
colours re-rendered); the run's `CRDedupedFile` writes them to output.log, holding back the last
line. Patched, many processes write into one log: each writer (a process, or a thread with a
rank of its own, and a stream) gets an emulator of its own, and a line goes out once it is
finished (the cursor left it), tagged, so that the lines of several writers never run into each
other and a progress bar lands as its last state under the tag of the writer that drew it.

console="wrap" hands raw text to its callbacks (wandb-core renders it into output.log). The
master's text stays raw; another process's text goes out in finished lines, its `\\r` redraws
resolved, as wandb-core resolves them for a single process.

Both hand their callbacks one text per stream per drain pass, not one per line: wandb's callbacks
(a message to wandb-core, a `CRDedupedFile` write) cost the master's GIL per call.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from safe_redirect.record import Record

__all__ = ["EmulatedLog", "LineScreen", "RawLog", "Screen", "emulated_screen_factory"]

#: (the process, its tag, the stream): one terminal each
Writer = tuple[int, str, str]
#: finished lines: (they redraw the writer's line that went out last, the lines as shown, joined
#: by "\n"). A redraw is one line; plain lines come as one text, so that a batch of them costs
#: a few string operations, not a few per line.
ScreenLine = tuple[bool, str]

# what wandb's emulator treats as other than text: `\r`, escape sequences and every character
# that `repr` shows as `\xNN` (its SEP_RE); a write without them is plain lines. In a long text
# they are looked for one by one (`in`, a memchr each): a character class costs ten times more.
_CONTROLS = ("\r", *(chr(i) for i in range(256) if repr(chr(i)).startswith("'\\x")))
_ASCII_CONTROLS = tuple(c for c in _CONTROLS if c.isascii())
_CONTROL = re.compile("[" + "".join(re.escape(c) for c in _CONTROLS) + "]")
# the emulator shows no trailing spaces: a space of default colour is an empty cell
_TRAILING_SPACES = re.compile(" +\n")
# two-character needles, searched for in whole batches: `in` costs ~1 ns a character there
# (CPython 3.11's search for short needles), these a third to a half of it
_SPACE_ENDS_LINE = re.compile(" \n")
_BLANK_LINE = re.compile(b"\n\n")


def _plain(text: str) -> bool:
    """Whole lines the emulator would show as they are (but for trailing spaces)."""
    if not text.endswith("\n"):
        return False
    if len(text) < 1024:
        return _CONTROL.search(text) is None
    return not any(c in text for c in (_ASCII_CONTROLS if text.isascii() else _CONTROLS))


class Screen(Protocol):
    def write(self, text: str) -> list[ScreenLine]:
        """Feed what the writer wrote; the lines it finished."""

    def take_all(self) -> list[ScreenLine]:
        """The lines still being drawn too (a flush: the writer may be gone)."""

    @property
    def idle(self) -> bool:
        """Nothing drawn that did not go out: the screen can be forgotten."""


class LineScreen:
    """`\\r` and `\\n` only: a line goes out once ended, as drawn after its `\\r` overwrites.
    Escape sequences are text. For wandb without `TerminalEmulator`, and for console="wrap"."""

    def __init__(self) -> None:
        self._line = ""  # the line being drawn
        self._cursor = 0

    @property
    def idle(self) -> bool:
        return not self._line

    def write(self, text: str) -> list[ScreenLine]:
        if not self._line and "\r" not in text and text.endswith("\n"):
            return [(False, text[:-1])]  # whole lines: the common case
        out: list[ScreenLine] = []
        for piece in re.split("([\r\n])", text):
            if piece == "\n":
                out.append((False, self._line))
                self._line, self._cursor = "", 0
            elif piece == "\r":
                self._cursor = 0
            elif piece:
                end = self._cursor + len(piece)
                self._line = self._line[:self._cursor] + piece + self._line[end:]
                self._cursor = end
        return out

    def take_all(self) -> list[ScreenLine]:
        return self.write("\n") if self._line else []


class EmulatedScreen:
    """One writer's terminal on wandb's own `TerminalEmulator`.

    A row goes out once the cursor is below it, up to the last row with text (blank rows wait
    for text after them, as wandb's emulator leaves trailing blank lines out). The row that went
    out last can still change (a program erasing or redrawing the line above): it goes out
    again as a redraw once the cursor is below it. Rows above that one are done.

    Plain lines (no `\\r`, no escapes) written while nothing is being drawn skip the emulator:
    it is made again, holding only the last line, when something else comes.
    """

    #: rows the emulator keeps above the last one that went out
    keep_rows = 64

    def __init__(self, emulator_class: Callable[[], Any], default_char: Any) -> None:
        self._new_emulator = emulator_class
        self._default_char = default_char
        self._emulator: Any = None  # None: at rest after whole lines (see _emulator_now)
        self._sent = 0  # the rows above this one went out
        self._last: str | None = None  # what row _sent - 1 went out as
        self._blank = 0  # at rest: blank rows since the last that went out

    @property
    def idle(self) -> bool:
        return self._emulator is None

    def write(self, text: str) -> list[ScreenLine]:
        if self._emulator is None and _plain(text):
            return self._plain_lines(text)
        emulator = self._emulator_now()
        try:
            emulator.write(text)
        except Exception:  # as wandb's StreamWrapper: an emulator failure loses the text only
            pass
        out = self._finished(emulator.cursor.y)
        self._rest_if_done()
        return out

    def take_all(self) -> list[ScreenLine]:
        if self._emulator is None:
            return []
        self._emulator._num_lines = None  # its cache: "\x1b[J" fills it mid-write, stale after
        out = self._finished(max(self._emulator.num_lines, self._emulator.cursor.y), True)
        self._rest_if_done()
        return out

    def _plain_lines(self, text: str) -> list[ScreenLine]:
        if _SPACE_ENDS_LINE.search(text):
            text = _TRAILING_SPACES.sub("\n", text)
        shown = text.rstrip("\n")
        if not shown:
            self._blank += len(text)
            return []
        block = "\n" * self._blank + shown
        self._blank = len(text) - len(shown) - 1  # blank rows after it wait for text
        self._last, self._sent = shown[shown.rfind("\n") + 1:], 1
        return [(False, block)]

    def _emulator_now(self) -> Any:
        """The emulator, made again after plain lines: the last line that went out (something
        may draw over it) under blank rows that stand for the lines before it (what is drawn
        there is lost, as wandb's own reads lose it), the cursor below it and the blank rows
        since."""
        if self._emulator is None:
            emulator = self._new_emulator()
            self._sent = 0  # nothing went out yet: no lines before
            if self._last is not None:
                emulator.cursor.y = self.keep_rows
                emulator.write(self._last + "\n")
                emulator.cursor.char = self._default_char.copy()
                self._sent = self.keep_rows + 1
            emulator.cursor.y = self._sent + self._blank
            self._emulator = emulator
        return self._emulator

    def _finished(self, below: int, everything: bool = False) -> list[ScreenLine]:
        """The rows above `below` that went out not yet, and the last one if it changed (once
        the cursor left it, or for `everything`)."""
        emulator = self._emulator
        out: list[ScreenLine] = []
        if self._last is not None and (everything or self._sent - 1 < below):
            now = emulator._get_line(self._sent - 1)
            if now != self._last:
                out.append((True, now))
                self._last = now
        rows = [emulator._get_line(y) for y in range(self._sent, below)]
        last = max((i for i, row in enumerate(rows) if row), default=-1)
        if last >= 0:
            out += [(False, row) for row in rows[:last + 1]]
            self._sent += last + 1
            self._last = rows[last]
        return out

    def _rest_if_done(self) -> None:
        """Nothing being drawn, nothing below the cursor, no colour left on: forget the
        emulator (see _emulator_now); else drop rows far above the cursor."""
        emulator = self._emulator
        cursor = emulator.cursor
        if cursor.x == 0 and cursor.y >= self._sent and cursor.char == self._default_char and (
                not any(emulator._get_line_len(y) for y in list(emulator.buffer)
                        if y >= cursor.y)):
            self._blank = cursor.y - self._sent
            self._sent = 0 if self._last is None else 1
            self._emulator = None
        elif self._sent > 2 * self.keep_rows and cursor.y >= self._sent - 1:
            shift = self._sent - 1 - self.keep_rows
            rows = {y - shift: row for y, row in emulator.buffer.items() if y >= shift}
            emulator.buffer.clear()
            emulator.buffer.update(rows)
            emulator._num_lines = None
            cursor.y -= shift
            self._sent -= shift


def emulated_screen_factory() -> Callable[[], Screen]:
    """Screens on wandb's `TerminalEmulator` where it has the one this module reads, else
    `LineScreen`."""
    try:
        from wandb.sdk.lib.redirect import Char, TerminalEmulator
    except ImportError:
        return LineScreen
    needed = ("_get_line", "_get_line_len", "write", "num_lines")
    if not all(hasattr(TerminalEmulator, name) for name in needed):
        return LineScreen
    default = Char()  # type: ignore[no-untyped-call]
    return lambda: EmulatedScreen(TerminalEmulator, default)


def _tagged(tag: str, lines: str) -> str:
    """A tag in front of every line with text: a blank line stays blank."""
    if not tag:
        return lines
    if "\n" not in lines:
        return tag + lines if lines else ""
    return "\n".join(tag + line if line else "" for line in lines.split("\n"))


def _lines_with_text(lines: str) -> int:
    """How many of the lines have text, counted up to 2: all a log writer's hold-back needs
    (see EmulatedLog). Looks at the first lines only, not at a whole batch."""
    count = start = 0
    while count < 2:
        end = lines.find("\n", start)
        if (len(lines) if end < 0 else end) > start:
            count += 1
        if end < 0:
            break
        start = end + 1
    return count


class EmulatedLog:
    """The lines of every writer, in the order they were finished, as wandb's emulating classes
    hand them on: per stream, whole lines, each tagged.

    Batches are cut for the log writer behind them, wandb's `CRDedupedFile` (one for both
    streams), which holds back the last line it got (a `\\r` line takes it back) and writes a
    blank line for a batch that leaves it no other. So the last line of a pass waits here too,
    for the next pass or a flush: a writer that erases or redraws it meanwhile (its screen's
    redraw) changes it in place. A redraw of a line that went out (a flush came between) is
    sent as `\\r` + the line while the log still ends with that writer's line, else as a line of
    its own; and a batch that would leave the log only a blank line (the first of all) waits.
    A line that waited `release_after` seconds goes on (wandb's online flush is every 2 s).
    """

    release_after = 2.0
    #: how long a writer's text waits before its screen takes it (see `_settle`): wandb's own
    #: emulators are read every 2 s, so that a screen erased soon after it was drawn leaves
    #: nothing in output.log; the drain passes every few ms, and the idle drain every 0.1 s
    settle_ns = 50_000_000

    def __init__(self, new_screen: Callable[[], Screen]) -> None:
        self._new_screen = new_screen
        self._screens: dict[Writer, Screen] = {}
        self._unsettled: deque[Record] = deque()  # fed, not yet on a screen (see _settle)
        self._pending: list[tuple[Writer, bool, str]] = []
        self._kept: list[tuple[Writer | None, str]] = []  # rendered, not yet handed on
        self._last_writer: Writer | None = None  # whose line the log ends with
        self._log_holds_line = False  # the log writer holds back a line
        self._kept_since = 0.0

    def feed(self, record: Record) -> None:
        self._unsettled.append(record)

    def _settle(self, final: bool) -> None:
        """Hand the screens what was written `settle_ns` ago or longer (everything for a
        flush), a writer's consecutive texts in one write: an erase or a redraw written soon
        after the lines it changes, in a later drain pass, still changes them before any of
        them goes out (a screen reads its finished lines after each write)."""
        now = time.time_ns()
        waiting = self._unsettled
        runs: list[tuple[Writer, list[str]]] = []  # a writer's consecutive texts: one write
        while waiting and (final or now - waiting[0].time_ns >= self.settle_ns):
            record = waiting.popleft()
            writer = (record.pid, record.tag, record.stream)
            if runs and runs[-1][0] == writer:
                runs[-1][1].append(record.text)
            else:
                runs.append((writer, [record.text]))
        for writer, texts in runs:
            screen = self._screens.get(writer)
            if screen is None:
                screen = self._screens[writer] = self._new_screen()
            self._pending += [(writer, redraw, line)
                              for redraw, line in screen.write("".join(texts))]

    def end_pass(self, final: bool) -> list[tuple[str, str]]:
        """(stream, text) to hand on, in order; `final`: a flush, everything goes."""
        self._settle(final)
        if final:
            for writer, screen in list(self._screens.items()):
                self._pending += [(writer, redraw, line) for redraw, line in screen.take_all()]
                if screen.idle:
                    del self._screens[writer]
        if not self._pending and not (final and self._kept):
            if not self._kept or time.monotonic() - self._kept_since < self.release_after:
                return []
            if self._held_after(self._kept)[0] < 2:
                return []  # it would leave the log only a blank line
            final = True  # release it
        entries, self._kept = self._kept, []
        for writer, redraw, lines in self._pending:
            self._render(entries, writer, redraw, lines)
        self._pending = []
        out = []
        while entries:  # one stream at a time
            stream = next((w[2] for w, _ in entries if w is not None), "stdout")
            n = next((i for i, (w, _) in enumerate(entries) if w is not None and w[2] != stream),
                     len(entries))
            group, entries = entries[:n], entries[n:]
            if not final and not entries:  # the last line waits (see the class)
                keeper, text = group.pop()
                if "\n" in text:
                    head, text = text.rsplit("\n", 1)
                    group.append((keeper, head))
                self._kept, self._kept_since = [(keeper, text)], time.monotonic()
                held, last_writer = self._held_after(group)
                if held < 2:  # the log would get only a blank line now
                    self._kept = group + self._kept
                    break
            else:
                held, last_writer = self._held_after(group)
            self._last_writer, self._log_holds_line = last_writer, held > 0
            text = "\n".join(text for _, text in group)
            if text.strip("\n"):  # not blank lines only
                out.append((stream, text + "\n"))
        return out

    def _render(self, entries: list[tuple[Writer | None, str]], writer: Writer, redraw: bool,
                lines: str) -> None:
        """Add a screen's lines; a redraw changes the line it redraws if not handed on yet."""
        tag = writer[1]
        tail_writer = entries[-1][0] if entries else self._last_writer
        if redraw and tail_writer == writer:
            if not entries:  # it went out: take it back
                entries.append((writer, "\r" + _tagged(tag, lines)))
                return
            text = entries[-1][1]
            head = text[:text.rfind("\n") + 1] or ("\r" if text.startswith("\r") else "")
            if lines:
                entries[-1] = (writer, head + _tagged(tag, lines))
            elif head in ("", "\r"):
                entries[-1:] = [(None, head)] if head else []
            else:
                entries[-1] = (None, head[:-1])  # the line before it: not known whose
        elif lines or not redraw:  # a redraw that cannot reach its line: a line of its own
            entries.append((writer if lines else None, _tagged(tag, lines)))

    def _held_after(self, group: list[tuple[Writer | None, str]]) -> tuple[int, Writer | None]:
        """How many lines (up to 2) the log writer has in hand after `group`, whose line
        the log then ends with."""
        held, last_writer = int(self._log_holds_line), self._last_writer
        for writer, text in group:
            if text.startswith("\r"):
                held = max(held - 1, 0)
            count = _lines_with_text(text)
            if count:
                held = min(held + count, 2)
                last_writer = writer
        return held, last_writer


class RawLog:
    """console="wrap": the master's text as written, another writer's in finished lines (its
    `\\r` redraws resolved, tagged), one log for both streams; per stream to the callbacks. A
    finished line never continues the master's unfinished one: it starts a line of its own."""

    def __init__(self) -> None:
        self._screens: dict[Writer, LineScreen] = {}
        self._pending: list[tuple[str, list[str]]] = []
        self._master_mid_line = False  # the log ends inside a line of the master

    def feed(self, record: Record) -> None:
        if not record.tag:  # the master's own
            self._add(record.stream, record.text)
            self._master_mid_line = not record.text.endswith("\n")
            return
        writer = (record.pid, record.tag, record.stream)
        screen = self._screens.get(writer)
        if screen is None:
            screen = self._screens[writer] = LineScreen()
        self._add_lines(record.stream, record.tag, screen.write(record.text))

    def end_pass(self, final: bool) -> list[tuple[str, str]]:
        if final:
            for (pid, tag, stream), screen in list(self._screens.items()):
                self._add_lines(stream, tag, screen.take_all())
                del self._screens[(pid, tag, stream)]
        out = [(stream, "".join(texts)) for stream, texts in self._pending]
        self._pending = []
        return out

    def _add_lines(self, stream: str, tag: str, lines: list[ScreenLine]) -> None:
        if lines:
            text = "".join(_tagged(tag, line) + "\n" for _, line in lines)
            if self._master_mid_line:
                text, self._master_mid_line = "\n" + text, False
            self._add(stream, text)

    def _add(self, stream: str, text: str) -> None:
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].append(text)
        else:
            self._pending.append((stream, [text]))


def faster_log_writer(callback: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`callback`, or where it is the `write` of wandb's `CRDedupedFile` (a run's output.log in
    "wrap_emu" and "redirect"), the same write without its regular-expression split per line
    for a batch of plain lines (no `\\r`, no blank line): the same bytes in the file, at a few
    string operations per batch (it was most of the master's cost of a print). Anything else
    goes to wandb's own `write`."""
    log: Any = getattr(callback, "__self__", None)
    if getattr(callback, "__name__", "") != "write" or type(log).__name__ != "CRDedupedFile":
        return callback
    if not all(hasattr(log, name) for name in ("_buff", "lock", "f")):
        return callback

    def write(data: Any) -> None:
        if (not isinstance(data, bytes) or not data.endswith(b"\n") or data.startswith(b"\n")
                or b"\r" in data or _BLANK_LINE.search(data)):
            callback(data)
            return
        head, _, last = data[:-1].rpartition(b"\n")
        with log.lock:
            done = [line for line in (log._buff, head) if line]
            log._buff = last
            log.f.write(b"\n".join(done) + b"\n")
            log.f.flush()

    return write
