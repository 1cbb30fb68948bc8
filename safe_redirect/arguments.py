"""What `install()` accepts: each argument checked at the call, before anything is set up.

A bad argument found later fails far from its cause (an `on_output` that is not callable used to
fail once per record on the drain thread; a misspelt tag field raised a bare `KeyError`). Checked
here, it raises at `install()` with a message naming the valid choices, and nothing is left
behind: no segment, no hook, no environment variable. `TypeError` for the wrong kind of value,
`ValueError` for a value of the right kind outside what is allowed.
"""

from __future__ import annotations

import math
import numbers
import string
from collections.abc import Iterable

from safe_redirect.ring import MAX_LANE_BYTES, MAX_LANES, MIN_LANE_BYTES, STREAMS

__all__ = ["MODES", "OVERFLOW_POLICIES", "TAG_FIELDS", "check_install_arguments", "check_streams",
           "check_tag"]

#: "wrap": hook sys.stdout / sys.stderr and their buffers (Python-level writes).
#: "fd": the same hooks, and pipes on fds 1 and 2 for what bypasses them (os.write, os.system,
#: C libraries).
MODES = ("wrap", "fd")
#: "block": a writer whose lane is full waits while the master keeps reading, and spills (writes to
#: its terminal only, counted) once the master has read nothing for `stall_timeout` seconds or is
#: dead. "spill": a writer never waits; what does not fit is spilled at once.
OVERFLOW_POLICIES = ("block", "spill")
#: the fields a tag template may use
TAG_FIELDS = ("rank", "pid", "name")


def check_install_arguments(on_output: object, mode: object, streams: object, tag: object,
                            lanes: object, lane_bytes: object, overflow: object,
                            stall_timeout: object, exit_timeout: object) -> tuple[str, ...]:
    """Raise TypeError or ValueError for the first bad argument; the stream names as a tuple
    (an iterator given as `streams` is consumed here)."""
    if on_output is not None and not callable(on_output):
        raise TypeError(f"on_output must be a callable taking a Record, or None, not "
                        f"{_shown(on_output)}")
    _check_choice("mode", mode, MODES)
    names = check_streams(streams)
    check_tag(tag)
    if not 1 <= _int("lanes", lanes) <= MAX_LANES:
        raise ValueError(f"lanes must be from 1 to {MAX_LANES}, not {lanes}")
    size = _int("lane_bytes", lane_bytes)
    if not MIN_LANE_BYTES <= size <= MAX_LANE_BYTES or size & (size - 1):
        raise ValueError(f"lane_bytes must be a power of two from {MIN_LANE_BYTES} to "
                         f"{MAX_LANE_BYTES} (4 KiB to 4 GiB), not {lane_bytes}")
    _check_choice("overflow", overflow, OVERFLOW_POLICIES)
    _check_seconds("stall_timeout", stall_timeout)
    _check_seconds("exit_timeout", exit_timeout)
    return names


def _shown(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, not {_shown(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, not {value!r}")


def check_streams(streams: object) -> tuple[str, ...]:
    if isinstance(streams, (str, bytes)):  # iterating "stdout" would give its letters
        raise TypeError(f"streams must be a sequence of stream names from {STREAMS}, not "
                        f"{_shown(streams)}: write streams=({streams!r},)")
    if not isinstance(streams, Iterable):
        raise TypeError(f"streams must be a sequence of stream names from {STREAMS}, not "
                        f"{_shown(streams)}")
    names = tuple(streams)
    for stream in names:
        if not isinstance(stream, str):
            raise TypeError(f"unknown stream {_shown(stream)}: choose from {STREAMS}")
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}: choose from {STREAMS}")
    if not names:
        raise ValueError(f"streams is empty: choose one or more of {STREAMS}")
    if len(set(names)) < len(names):
        raise ValueError(f"streams names a stream twice: {names}; choose each of {STREAMS} "
                         "once at most")
    return names


def check_tag(tag: object) -> None:
    valid = " ".join(f"{{{field}}}" for field in TAG_FIELDS)
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a str (a format template using {valid}), not {_shown(tag)}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(tag) if field is not None]
    except ValueError as exc:  # "[{rank", "[rank}"
        raise ValueError(f"tag {tag!r} is not a valid format template ({exc}); fields: "
                         f"{valid}, braces doubled as {{{{ }}}}") from None
    for field in fields:
        base = field.split(".", 1)[0].split("[", 1)[0]
        if base == "" or base.isdigit():
            raise ValueError(f"tag {tag!r} uses a positional field {{{field}}}: name one of "
                             f"{valid}")
        if base not in TAG_FIELDS:
            raise ValueError(f"tag {tag!r} uses an unknown field {{{field}}}: choose from "
                             f"{valid}")
    for name in ("", "SpawnPoolWorker-1"):  # as tags are rendered (record.render_tag)
        try:
            tag.format(rank=0, pid=1, name=name)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise ValueError(f"tag {tag!r} cannot be rendered ({type(exc).__name__}: {exc}); "
                             f"{{rank}} and {{pid}} are ints, {{name}} a str") from None


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {_shown(value)}")
    return value


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds (int or float), not "
                        f"{_shown(value)}")
    if not (math.isfinite(value) and float(value) >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
