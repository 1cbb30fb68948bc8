"""pytest plugin: the output of every process a test starts, tagged, in the `capmp` fixture and in
the report of a failing test.

Why: `capsys` loses what a forked child prints (the child writes into its own copy of pytest's
in-memory stream), `capfd` gets it untagged and interleaved, and a spawned child whose output is
captured at the Python level is lost. A safe_redirect session per test fixes all three; this
plugin decides *when* that session lives, because a session hooks the object that is
`sys.stdout` at the moment it is installed, and pytest swaps those objects around:

- pytest's global capture puts one stream object per stream in place for setup, call and
  teardown of every test (the same object each time) and the real one back in between;
- `capsys` / `capfd` put objects of their own in place on top of it while the test runs;
- `pytest --forked` runs each test in a forked process, `pytest -n` in worker processes.

So the session is installed by the `capmp` fixture inside the test's own process (never in the
pytest-forked parent or the xdist controller: nothing of ours is inherited by a test process, and
no controller exports SAFE_REDIRECT_ATTACH to its workers), after pytest's capture fixtures the
test uses have put their streams in place, and it lives until the fixture's teardown. capsys and
capfd put *new* stream objects in place for every phase (pytest >= 8); for the call and the
teardown phase a second session hooks those, for that phase only, next to the first, which keeps
capturing the children that were started before (a pool made by a fixture, say).

Why wrap mode only: under pytest's fd capture, `sys.stdout` writes to a temporary file's own fd,
not to fd 1, so pipes on fds 1 and 2 (mode="fd") would miss every `print` of the test and of its
forked children.

A plugin loaded but unused costs a stash look-up in a few hooks per test and changes nothing.
"""

from __future__ import annotations

import enum
import os
import sys
import threading
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import pytest

if TYPE_CHECKING:  # imported when a capture starts: loading the plugin stays cheap
    from safe_redirect.record import Record
    from safe_redirect.session import Session

__all__ = ["CaptureResult", "MultiProcessCapture", "capmp"]

#: pytest shows it as "Captured output of child processes setup|call|teardown"
SECTION = "output of child processes"
#: how long reading the capture waits for what was written so far to be delivered, seconds
FLUSH_TIMEOUT = 10.0
#: the streams a capture hooks
STREAMS = ("stdout", "stderr")
#: pytest's fixtures that put a stream of their own on sys.stdout while the test runs
PYTEST_CAPTURE_FIXTURES = ("capsys", "capsysbinary", "capteesys", "capfd", "capfdbinary")


class CaptureResult(NamedTuple):
    """`(out, err)` as pytest's `capsys.readouterr()` returns it."""

    out: str
    err: str


class CaptureState(enum.Enum):
    NEW = "new"
    CAPTURING = "capturing"
    DONE = "done"


class MultiProcessCapture:
    """What the `capmp` fixture gives a test: the output of its own process and of every child it
    starts (fork, spawn, forkserver, `subprocess` python), children's lines tagged."""

    def __init__(self) -> None:
        from safe_redirect.record import Interleaver

        self.state = CaptureState.NEW
        self._session: Session | None = None  # from the fixture's setup to its teardown
        self._hooked: dict[str, object] = {}  # the stream objects it hooks, by name
        self._phase_session: Session | None = None  # on the streams capsys/capfd put in place
        self._pid = os.getpid()
        self._lock = threading.Lock()  # records arrive on the sessions' drain threads
        self._records: list[Record] = []
        self._read_upto = 0  # readouterr() has returned the records before this index
        self._readout = Interleaver()  # lines of two processes never share a line of readouterr()
        self._reported_upto = 0  # report sections hold the records before this index

    def __repr__(self) -> str:
        return (f"<MultiProcessCapture {self.state.value} records={len(self._records)} "
                f"session={self._session!r} phase_session={self._phase_session!r}>")

    # -- what a test calls

    def readouterr(self) -> CaptureResult:
        """Everything written since the last call (or the start): the test process's lines as
        written, children's lines with their tag in front."""
        self._flush()
        with self._lock:
            new = self._records[self._read_upto:]
            self._read_upto = len(self._records)
        text: dict[str, list[str]] = {"stdout": [], "stderr": []}
        for record in new:
            text[record.stream].append(self._readout.render(record))
        return CaptureResult("".join(text["stdout"]), "".join(text["stderr"]))

    def records(self) -> list[Record]:
        """Every record so far, in delivery order, whatever `readouterr()` already returned."""
        self._flush()
        with self._lock:
            return list(self._records)

    def by_process(self) -> dict[int, CaptureResult]:
        """Everything written so far, untagged, per pid (the test process's own included), in the
        order the processes were first heard from."""
        per_pid: dict[int, list[Record]] = {}
        for record in self.records():
            per_pid.setdefault(record.pid, []).append(record)
        return {pid: CaptureResult(_text(records, "stdout"), _text(records, "stderr"))
                for pid, records in per_pid.items()}

    # -- what the plugin calls

    def _start(self) -> None:
        if self.state is not CaptureState.NEW:
            raise RuntimeError(f"capture is {self.state.value}, not new")
        self._pid = os.getpid()
        from safe_redirect.session import install

        self._session = install(self._collect, mode="wrap", streams=STREAMS)
        self._hooked = {name: getattr(sys, name) for name in STREAMS}
        self.state = CaptureState.CAPTURING

    def _begin_phase(self) -> None:
        """Hook the streams that capsys or capfd put in place for this phase, if any."""
        if self.state is not CaptureState.CAPTURING or self._phase_session is not None:
            return
        new = tuple(name for name in STREAMS if getattr(sys, name) is not self._hooked[name])
        if new:  # a stream hooked by both sessions would deliver each line twice
            from safe_redirect.session import install

            self._phase_session = install(self._collect, mode="wrap", streams=new)

    def _end_phase(self) -> None:
        session, self._phase_session = self._phase_session, None
        if session is not None:
            session.uninstall(timeout=FLUSH_TIMEOUT)

    def _stop(self) -> None:
        """Deliver what is left, restore the streams; idempotent."""
        self._end_phase()
        session, self._session = self._session, None
        self.state = CaptureState.DONE
        if session is None:
            return
        session.uninstall(timeout=FLUSH_TIMEOUT)

    def _collect(self, record: Record) -> None:
        with self._lock:
            self._records.append(record)

    def _flush(self) -> None:
        for session in (self._session, self._phase_session):
            if session is not None:
                session.flush(timeout=FLUSH_TIMEOUT)

    def _children_report(self) -> str:
        """The children's lines not yet in a report section, grouped by process."""
        self._flush()
        with self._lock:
            new = self._records[self._reported_upto:]
            self._reported_upto = len(self._records)
        return _grouped_by_process(r for r in new if r.pid != self._pid)


def _text(records: Iterable[Record], stream: str, tagged: bool = False) -> str:
    return "".join(r.tagged() if tagged else r.text for r in records if r.stream == stream)


def _grouped_by_process(records: Iterable[Record]) -> str:
    """Per process (in the order they were first heard from) its stdout, then its stderr."""
    groups: dict[int, dict[str, list[Record]]] = {}
    for record in records:
        groups.setdefault(record.pid, {"stdout": [], "stderr": []})[record.stream].append(record)
    parts = []
    for pid, streams in groups.items():
        for stream, stream_records in streams.items():
            if stream_records:
                text = _text(stream_records, stream, tagged=True)
                parts.append(f"pid {pid} {stream}:\n{text}" + ("" if text.endswith("\n") else "\n"))
    return "".join(parts)


# -- the plugin

_CAPTURE = pytest.StashKey[MultiProcessCapture]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("safe_redirect", "output of child processes (safe_redirect)")
    group.addoption(
        "--safe-redirect-all", action="store_true", default=False, dest="safe_redirect_all",
        help="capture every process's output in every test, as if each test used the capmp "
             "fixture: a failing test's report shows the output of the processes it started.")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("safe_redirect_all"):
        config.pluginmanager.register(_EveryTest(), "safe_redirect_all")


class _EveryTest:
    """Registered by --safe-redirect-all: every test gets `capmp`."""

    @pytest.fixture(autouse=True)
    def _safe_redirect_every_test(self, request: pytest.FixtureRequest) -> None:
        request.getfixturevalue("capmp")


@pytest.fixture
def capmp(request: pytest.FixtureRequest) -> Iterator[MultiProcessCapture]:
    """The output of this test's process and of every process it starts, children's lines tagged:
    `capmp.readouterr()` -> `(out, err)` since the last call, `capmp.records()`,
    `capmp.by_process()`."""
    for name in PYTEST_CAPTURE_FIXTURES:
        if name in request.fixturenames:
            request.getfixturevalue(name)  # its stream must be in place before we hook it
    capture = MultiProcessCapture()
    request.node.stash[_CAPTURE] = capture
    capture._start()
    yield capture
    capture._stop()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Inside pytest's capture wrapper: the phase's streams are in place here."""
    return (yield from _phase(item))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _phase(item))


def _phase(item: pytest.Item) -> Generator[None, object, object]:
    capture = item.stash.get(_CAPTURE, None)
    if capture is None:
        return (yield)
    capture._begin_phase()
    try:
        return (yield)
    finally:
        capture._end_phase()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """The children's lines of this phase as a report section, after pytest's own "Captured
    stdout" ones, and carried into later phases' reports as pytest carries its own."""
    capture = item.stash.get(_CAPTURE, None)
    if capture is not None:
        item.add_report_section(call.when, SECTION, capture._children_report())
        if call.when == "teardown":
            del item.stash[_CAPTURE]  # items live as long as the session; records need not
    return (yield)
