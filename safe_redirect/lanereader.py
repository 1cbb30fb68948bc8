"""Lines rebuilt from one lane's records: `LaneReader`, the drain's per-record work.

A unit because it is the one place a lane's bytes become text: partial writes wait for their
newline (or `\\r`, or a flush, or the writer's exit), each writing thread's line is rebuilt apart
(two threads never splice into one line), UTF-8 split across writes is joined by an incremental
decoder, invalid bytes become U+FFFD instead of an exception, and lines that follow each other
closely share a `Record`. It knows no thread, segment or callback: `drain.py` reads the lanes and
feeds it; tests feed it records made by hand. It runs once per record, so what `Segment.read`
returns stays a plain tuple (`ring.LaneRecord`), unpacked by name in `feed`.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import replace

from safe_redirect.record import Record, render_tag
from safe_redirect.ring import STREAMS, LaneRecord, RecordFlag
from safe_redirect.stamp import Stamp

__all__ = ["JOIN_GAP_NS", "MAX_PARTIAL_CHARS", "LaneReader"]

# A partial line longer than this is delivered as it is rather than held without bound.
MAX_PARTIAL_CHARS = 1 << 20
#: Writes of one thread follow each other this closely (ns) to share a Record, whose time is its
#: first line's: a writer that paused longer (say, for its workers) starts a Record of its own, so
#: that the drain can order its later lines after what other processes wrote meanwhile. A writer
#: printing flat out stays in few Records (a pause is longer than a print: ~1-3 µs).
JOIN_GAP_NS = 20_000
# RecordFlag bits as plain ints: `int & IntFlag` would make a flag object for every record
_FLUSH = int(RecordFlag.FLUSH)
_GAP = int(RecordFlag.GAP)


def _cut_point(text: str) -> int:
    """Index just past the last line end in `text` (0 if none). A `\\r` at the very end waits:
    the next write may begin with the `\\n` of a `\\r\\n`."""
    end = len(text)
    while True:
        i = max(text.rfind("\n", 0, end), text.rfind("\r", 0, end))
        if i < 0:
            return 0
        if text[i] == "\r" and i == len(text) - 1:
            end = i
            continue
        return i + 1


class _StreamState:
    """One thread's partial line on one stream."""

    __slots__ = ("decoder", "mid_line", "partial", "partial_time", "rank")

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.partial = ""
        self.partial_time = 0
        self.rank = -1  # the writing thread's own rank, if it has one
        self.mid_line = False  # what was delivered last ended inside a line

    def delivered(self, text: str) -> bool:
        """Note that `text` goes out; whether it continues the line delivered before it."""
        continued = self.mid_line
        self.mid_line = not text.endswith(("\n", "\r"))
        return continued


class LaneReader:
    """Rebuilds the lines of one lane's owner from its records."""

    def __init__(self, pid: int, start_us: int, rank: int | None, name: str = "",
                 template: str = "[rank{rank}] ", master: bool = False) -> None:
        self.owner = Stamp(pid, start_us)
        self.rank = rank
        self.name = name
        self._template = template
        self._master = master
        self.tag = "" if master else render_tag(template, rank, pid, name)
        self._streams: dict[tuple[int, int], _StreamState] = {}  # by (stream, thread)
        #: the rank and the writing thread its records carried last (in fd mode the pump, which
        #: stamps the rank it reads from the environment): what is recovered from its pipes after
        #: its death (childpipes.py) continues that thread's line and is tagged with that rank
        self.last_thread_rank = -1
        self.last_thread = 0
        #: asked before each feed: the owner may have set its rank and name anew since
        self.refresh: Callable[[], None] | None = None

    def rename(self, rank: int | None, name: str) -> None:
        """The owner's rank and name changed (a child named by a launcher after it claimed its
        lane): lines from now on get the new tag."""
        self.rank, self.name = rank, name
        if not self._master:
            self.tag = render_tag(self._template, rank, self.owner.pid, name)

    def _record(self, stream: int, text: str, time_ns: int, thread_rank: int = -1,
                continued: bool = False) -> Record:
        """A Record of this owner; a thread with a rank of its own (torch_xla) is tagged by it."""
        name = STREAMS[stream] if stream < len(STREAMS) else f"stream{stream}"
        if thread_rank < 0:
            return Record(name, text, self.tag, self.owner.pid, self.rank, time_ns, continued)
        tag = render_tag(self._template, thread_rank, self.owner.pid, self.name)
        return Record(name, text, tag, self.owner.pid, thread_rank, time_ns, continued)

    def feed(self, records: list[LaneRecord]) -> list[Record]:
        """Whole lines found in `records`; consecutive lines of one stream and origin share a
        Record unless their writer paused longer than JOIN_GAP_NS between them. Lines are rebuilt
        per writing thread: two threads never splice into one line."""
        out: list[Record] = []
        cut_before = False  # a line was cut short (FLAG_GAP): the next text must not join it
        last_time = 0  # when the lines last emitted began
        if self.refresh is not None:
            self.refresh()

        def emit(state: _StreamState, stream: int, text: str, time_ns: int,
                 thread_rank: int) -> None:
            nonlocal cut_before, last_time
            record = self._record(stream, text, time_ns, thread_rank, state.delivered(text))
            last = out[-1] if out else None
            if last and not cut_before and (last.stream, last.tag, last.rank) == (
                    record.stream, record.tag, record.rank) and (
                    0 <= time_ns - last_time <= JOIN_GAP_NS):
                out[-1] = replace(last, text=last.text + text)
            else:
                out.append(record)
            cut_before = False
            last_time = time_ns

        for stream, flags, time_ns, payload, thread, thread_rank in records:
            if thread_rank >= 0:
                self.last_thread_rank = thread_rank
            self.last_thread = thread
            state = self._streams.get((stream, thread))
            if state is None:
                state = self._streams[(stream, thread)] = _StreamState()
            if flags & _FLUSH:
                # The flushing thread's partial line only: another thread's may be half written
                # (print(..., flush=True) from rank threads); it waits for its own end.
                text = state.partial + state.decoder.decode(b"", final=True)
                if text:
                    emit(state, stream, text, state.partial_time or time_ns, state.rank)
                state.partial = ""
                continue
            if flags & _GAP:
                # The writer spilled the rest of the line it had open (a full lane): that line
                # ends here as it is, in a Record of its own; what follows starts a new line.
                head = state.partial + state.decoder.decode(b"", final=True)
                state.partial = ""
                if head:
                    emit(state, stream, head, state.partial_time or time_ns, state.rank)
                    state.mid_line = False
                    cut_before = True
            text = state.decoder.decode(payload)
            if not text:
                continue
            if not state.partial:
                state.partial_time, state.rank = time_ns, thread_rank
            pending = state.partial + text
            cut = _cut_point(pending)
            if cut:
                emit(state, stream, pending[:cut], state.partial_time, state.rank)
                pending = pending[cut:]
                state.partial_time, state.rank = time_ns, thread_rank
            if len(pending) > MAX_PARTIAL_CHARS:
                emit(state, stream, pending, state.partial_time, state.rank)
                pending = ""
            state.partial = pending
        return out

    def flush(self) -> list[Record]:
        """Deliver partial lines too: the writer flushed, exited, or the master asked for all."""
        out: list[Record] = []
        for (stream, _), state in sorted(self._streams.items()):
            text = state.partial + state.decoder.decode(b"", final=True)
            state.partial = ""
            if text:
                out.append(self._record(stream, text, state.partial_time, state.rank,
                                        state.delivered(text)))
        return out
