"""The public output type: `Record`, what `on_output` receives, and how records are rendered.

Kept apart from the drain that makes them: a user of `Record` (a callback, wandb's output.log, the
pytest plugin's readout, a benchmark) needs the type, its tag and `Interleaver`, not the reader
thread, the ring or the C module. Importing this module loads nothing else of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Interleaver", "LastStates", "Record", "render_tag"]


@dataclass(frozen=True)
class Record:
    """One or more whole lines that one process wrote to one stream, in the order written."""

    stream: str  # "stdout" or "stderr"
    text: str  # as written, without the tag
    tag: str  # rendered tag of the writing process; "" for the master's own lines
    pid: int
    rank: int | None
    time_ns: int  # wall clock (time.time_ns) of the write that began the first line
    #: the text goes on with a line whose beginning an earlier record delivered (a flush came
    #: before the line's end, as progress bars do): its first line takes no tag
    continued: bool = False

    def tagged(self) -> str:
        """The text with the tag in front of every line, as it should be shown or logged."""
        if not self.tag:
            return self.text
        lines = self.text.splitlines(keepends=True)
        head = lines.pop(0) if self.continued and lines else ""
        return head + "".join(self.tag + line for line in lines)


class Interleaver:
    """Renders the records of many processes into one text per stream, as a run log shows them.

    A record may end inside a line: its writer flushed before the newline (a progress bar), or
    left a bare `\\r` to draw over the line. Another process's text must not continue or overwrite
    that line (a terminal emulator, as in wandb's output.log, would do both), so it starts on a
    new one; the same writer's continuation joins its line untagged.
    """

    def __init__(self, one_log: bool = False) -> None:
        #: both streams go to one log (wandb's output.log): a line open on stdout is open there
        self._one_log = one_log
        # log -> (the writer whose line is open, whether it ended in "\r" to be drawn over)
        self._open: dict[str, tuple[tuple[int, str, str], bool]] = {}

    def render(self, record: Record) -> str:
        writer = (record.pid, record.tag, record.stream)
        log = "log" if self._one_log else record.stream
        holder, redraw = self._open.get(log, (None, False))
        if holder != writer and record.continued:  # its line was cut off: tag the rest anew
            record = replace(record, continued=False)
        text = record.tagged()
        # a new line of the same writer after an unfinished one (cut short by a spill, or
        # another thread's): it starts a line of its own too, unless it draws over a "\r"
        if holder is not None and (holder != writer or not (record.continued or redraw)):
            text = "\n" + text
        if record.text.endswith("\n"):
            self._open.pop(log, None)
        else:
            self._open[log] = (writer, record.text.endswith("\r"))
        return text


class LastStates:
    """Each process's lines as a log file keeps them: whole lines in the order they were
    finished, a line drawn over with `\\r` (a progress bar) in its last state, never two
    processes on one line. A record that goes on with a line an earlier one began
    (`Record.continued`), or draws over one that ended in `\\r`, finishes that line; one that
    does neither ends it where it was cut."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, str], tuple[Record, str]] = {}  # writer -> its open line

    def feed(self, record: Record) -> list[tuple[Record, str]]:
        """The lines `record` finishes, each with the record it came with (tag, rank, ...)."""
        writer = (record.pid, record.stream)
        opened, head = self._open.pop(writer, (record, ""))
        finished = []
        if head and not record.continued and not head.endswith("\r"):
            finished.append((opened, _last_state(head)))  # cut short (a spill): it ends there
            head = ""
        *lines, rest = (head + record.text).split("\n")
        finished += [(record, _last_state(line)) for line in lines]
        if rest:
            self._open[writer] = (record, rest)
        return finished

    def unfinished(self) -> list[tuple[Record, str]]:
        """The lines begun and not ended yet, in their state now."""
        return [(record, _last_state(rest)) for record, rest in self._open.values()]

    def end(self) -> list[tuple[Record, str]]:
        """The lines left unfinished, as they are; none is kept."""
        lines = self.unfinished()
        self._open.clear()
        return lines


def _last_state(line: str) -> str:
    return line.rsplit("\r", 1)[-1]


def render_tag(template: str, rank: int | None, pid: int, name: str = "") -> str:
    """`template` filled in ({rank}, {pid}, {name}) for a process with a rank; one without is
    tagged by its multiprocessing name, else by its pid."""
    if rank is None:
        return f"[{name}] " if name else f"[pid{pid}] "
    return template.format(rank=rank, pid=pid, name=name)
