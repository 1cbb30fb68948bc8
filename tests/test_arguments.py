"""Bad arguments fail at install(), with a message naming the valid choices, and leave nothing
installed: no segment in /dev/shm, no hook, no environment variable, no session, no thread."""

from __future__ import annotations

import os
import sys
import threading

import pytest

import safe_redirect

from .internals import MAX_LANE_BYTES, MAX_LANES, MIN_LANE_BYTES, active_sessions

TAG_FIELDS = ("{rank}", "{pid}", "{name}")
LANE_BYTES = ("power of two", "4096", str(MAX_LANE_BYTES))
SECONDS = ("finite number of seconds >= 0",)

BAD = [  # (arguments, exception, what the message must name)
    ({"on_output": 42}, TypeError, ("on_output must be a callable", "or None", "42 (int)")),
    ({"on_output": "print"}, TypeError, ("on_output must be a callable",)),
    ({"tag": "[{rnk}] "}, ValueError, ("unknown field {rnk}", *TAG_FIELDS)),
    ({"tag": "[{rank"}, ValueError, ("not a valid format template", *TAG_FIELDS)),
    ({"tag": "[rank}] "}, ValueError, ("not a valid format template", *TAG_FIELDS)),
    ({"tag": "[{}] "}, ValueError, ("positional field {}", *TAG_FIELDS)),
    ({"tag": "[{0}] "}, ValueError, ("positional field {0}", *TAG_FIELDS)),
    ({"tag": "[{name:d}] "}, ValueError, ("cannot be rendered", "{name} a str")),
    ({"tag": "[{rank[0]}] "}, ValueError, ("cannot be rendered", "{rank} and {pid} are ints")),
    ({"tag": "[{rank:{width}}] "}, ValueError, ("cannot be rendered",)),
    ({"tag": b"[{rank}] "}, TypeError, ("tag must be a str", *TAG_FIELDS)),
    ({"tag": None}, TypeError, ("tag must be a str",)),
    ({"lanes": 0}, ValueError, ("lanes must be from 1 to", str(MAX_LANES))),
    ({"lanes": MAX_LANES + 1}, ValueError, ("lanes must be from 1 to",)),
    ({"lanes": -3}, ValueError, ("lanes must be from 1 to",)),
    ({"lanes": 8.0}, TypeError, ("lanes must be an int", "8.0 (float)")),
    ({"lanes": True}, TypeError, ("lanes must be an int", "True (bool)")),
    ({"lanes": "64"}, TypeError, ("lanes must be an int",)),
    ({"lane_bytes": 5000}, ValueError, LANE_BYTES),
    ({"lane_bytes": 2048}, ValueError, LANE_BYTES),
    ({"lane_bytes": 0}, ValueError, LANE_BYTES),
    ({"lane_bytes": MAX_LANE_BYTES * 2}, ValueError, LANE_BYTES),
    ({"lane_bytes": 65536.0}, TypeError, ("lane_bytes must be an int",)),
    ({"mode": "tty"}, ValueError, ("mode must be one of", "'wrap'", "'fd'")),
    ({"mode": "WRAP"}, ValueError, ("mode must be one of", "'wrap'", "'fd'")),
    ({"mode": None}, TypeError, ("mode must be one of", "'wrap'", "'fd'")),
    ({"overflow": "drop"}, ValueError, ("overflow must be one of", "'block'", "'spill'")),
    ({"overflow": 1}, TypeError, ("overflow must be one of", "'block'", "'spill'")),
    ({"streams": ("stdin",)}, ValueError, ("unknown stream 'stdin'", "'stdout'", "'stderr'")),
    ({"streams": "stdout"}, TypeError, ("streams=('stdout',)", "'stderr'")),
    ({"streams": 1}, TypeError, ("streams must be a sequence", "'stdout'", "'stderr'")),
    ({"streams": (sys.stdout,)}, TypeError, ("unknown stream", "'stdout'", "'stderr'")),
    ({"streams": ()}, ValueError, ("streams is empty", "'stdout'", "'stderr'")),
    ({"streams": ("stdout", "stdout")}, ValueError, ("twice", "'stdout'", "'stderr'")),
    ({"stall_timeout": -1}, ValueError, ("stall_timeout", *SECONDS)),
    ({"stall_timeout": float("nan")}, ValueError, ("stall_timeout", *SECONDS)),
    ({"stall_timeout": float("inf")}, ValueError, ("stall_timeout", *SECONDS)),
    ({"stall_timeout": "2"}, TypeError, ("stall_timeout must be a number of seconds",)),
    ({"stall_timeout": None}, TypeError, ("stall_timeout must be a number of seconds",)),
    ({"exit_timeout": -0.5}, ValueError, ("exit_timeout", *SECONDS)),
    ({"exit_timeout": False}, TypeError, ("exit_timeout must be a number of seconds", "(bool)")),
]


def _installed_state() -> tuple[object, ...]:
    """What install() would change: hooks, environment, sessions, threads, segments."""
    prefix = f"safe_redirect-{os.getpid()}-"
    segments = {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
    return (sys.stdout, sys.stderr, sys.stdout.write, sys.stderr.write,
            getattr(sys.stdout, "buffer", None) and sys.stdout.buffer.write,
            os.environ.get("SAFE_REDIRECT_ATTACH"), active_sessions(),
            threading.active_count(), segments, os.fstat(1).st_ino, os.fstat(2).st_ino)


@pytest.mark.parametrize("mode", ["wrap", "fd"])
@pytest.mark.parametrize(("arguments", "error", "names"), BAD,
                         ids=[f"{next(iter(a))}={next(iter(a.values()))!r}" for a, _, _ in BAD])
def test_a_bad_argument_fails_at_install_naming_the_choices_and_leaves_nothing(
        arguments, error, names, mode) -> None:
    arguments = {"mode": mode, **arguments}
    before = _installed_state()
    with pytest.raises(error) as raised:
        safe_redirect.install(**arguments)
    assert type(raised.value) is error
    for name in names:
        assert name in str(raised.value)
    assert _installed_state() == before


def test_the_edges_of_what_is_valid_are_accepted() -> None:
    records: list[safe_redirect.Record] = []
    with safe_redirect.install(records.append, streams=iter(["stderr"]), lanes=1,
                               lane_bytes=MIN_LANE_BYTES, stall_timeout=0,
                               exit_timeout=0.0, tag="{{{rank:>3}}} {pid!r} {name} ") as s:
        print("to stderr", file=sys.stderr)
        assert s.flush(timeout=10)
    assert [r.text for r in records] == ["to stderr\n"]
    with safe_redirect.install(None, overflow="spill", tag="", streams=["stdout", "stderr"]):
        pass
