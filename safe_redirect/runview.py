"""What `safe-redirect run` shows on its terminal.

Finished lines scroll, each under its process's tag, a line drawn over with `\\r` in its last
state (`LastStates`), never two processes on one line. On a terminal (fds 1 and 2 both ttys)
the tags are coloured per rank (`rich`; `--no-color` or NO_COLOR turns colours off), and each
process's unfinished line, a progress bar being drawn, stays readable in a live region at the
bottom, one line per process, until it ends and scrolls with the rest. Elsewhere (a pipe, a
file) only finished lines, so a bar appears once, in its last state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TextIO

from safe_redirect.record import LastStates, Record

__all__ = ["TerminalView"]

#: a colour per rank, in turn (rich's names); processes without a rank are dim
PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan",
           "bright_magenta", "bright_green", "bright_yellow", "bright_blue", "red")


def _always(source: Record, line: str) -> bool:
    return True


class TerminalView:
    """The records, shown on the terminal `out` / `err` (fds of ours alone)."""

    def __init__(self, out: int, err: int, color: bool = True) -> None:
        self._states = LastStates()
        self._files: dict[str, TextIO] = {
            "stdout": os.fdopen(os.dup(out), "w", encoding="utf-8", errors="replace"),
            "stderr": os.fdopen(os.dup(err), "w", encoding="utf-8", errors="replace")}
        self._console: Any = None
        self._live: Any = None
        if os.isatty(out) and os.isatty(err):
            self._start_live(color and not os.environ.get("NO_COLOR"))

    def _start_live(self, color: bool) -> None:
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:  # rich is optional: plain lines then
            return
        self._console = Console(file=self._files["stdout"], force_terminal=True,
                                no_color=not color, highlight=False, markup=False,
                                emoji=False, soft_wrap=True)
        self._live = Live(console=self._console, auto_refresh=False, transient=True,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def show(self, record: Record, keep: Callable[[Record, str], bool] = _always) -> None:
        """On the drain thread: the lines `record` finishes that `keep(source, line)` keeps."""
        finished = self._states.feed(record)
        if finished and self._live is not None:
            self._update_live(refresh=True)  # a finished line leaves the live region at once
        for source, line in finished:
            if keep(source, line):
                self._line(source, line)

    def refresh(self) -> None:
        """After a drain pass: the live region shows the unfinished lines as they are now."""
        if self._live is not None:
            self._update_live(refresh=True)
        for file in self._files.values():
            file.flush()

    def _update_live(self, refresh: bool) -> None:
        from rich.console import Group

        self._live.update(Group(*(self._text(source, line)
                                  for source, line in self._states.unfinished())),
                          refresh=refresh)

    def close(self) -> None:
        for source, line in self._states.end():
            self._line(source, line)
        if self._live is not None:
            self._live.update("")
            self._live.stop()
        for file in self._files.values():
            try:
                file.close()
            except OSError:
                pass

    def note(self, stream: str, text: str) -> None:
        """A line of ours (a `--dedup` summary: tagged already)."""
        if self._console is not None:
            from rich.text import Text

            self._console.print(Text(text.rstrip("\n"), style="dim"))
            return
        try:
            self._files[stream].write(text)
        except OSError:
            pass

    def _line(self, source: Record, line: str) -> None:
        if self._console is not None:
            self._console.print(self._text(source, line))
            return
        try:
            self._files[source.stream].write(f"{source.tag}{line}\n")
        except OSError:
            pass  # the terminal went away: the logs still have it

    def _text(self, source: Record, line: str) -> Any:
        from rich.text import Text

        style = "dim" if source.rank is None else PALETTE[source.rank % len(PALETTE)]
        text = Text(source.tag, style=style) if source.tag else Text()
        if source.stream == "stderr":
            text.append("(stderr) ", style="red")
        text.append(line)
        return text
