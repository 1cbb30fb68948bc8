"""Spawned interpreters join their master through the environment.

A spawned process (multiprocessing spawn or forkserver, `subprocess` running python, and their
children) inherits no Python state, only the environment. The master exports SAFE_REDIRECT_ATTACH
(the segment's name, the master's stamp and the capture options); a `.pth` file in site-packages
runs `safe_redirect.bootstrap.process_startup()` at interpreter start-up, and only when that
variable is set: an unset variable costs one dictionary look-up (coverage.py measures subprocesses
the same way).

The `.pth` is installed with the package's wheel; an editable install ships none, so `install()`
writes it on first use where it is missing (`ensure_pth`).

A multiprocessing forkserver is the exception: one long-lived process that forks the children of
every later request, whatever session is current then (or none). It attaches to nothing; each
request carries the requester's session (`_HandOver`) and the child attaches to that one.
"""

from __future__ import annotations

import json
import os
import site
import sys
import sysconfig
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "ENV_VAR", "HAND_OVER_KEY", "JOB_VAR", "PATCH_VAR", "PTH_LINE", "PTH_NAME", "AttachInfo",
    "ensure_pth", "export", "forkserver_pid", "hand_over_to_forkserver_children", "is_forkserver",
    "unexport",
]

ENV_VAR = "SAFE_REDIRECT_ATTACH"
PATCH_VAR = "SAFE_REDIRECT_PATCH"  # "wandb": patch wandb in every process, no code change
PTH_NAME = "safe_redirect.pth"
JOB_VAR = "SAFE_REDIRECT_JOB"  # a job's segment on this node (job.py)
PTH_LINE = (f"import os; ({ENV_VAR!r} in os.environ or {PATCH_VAR!r} in os.environ or "
            f"{JOB_VAR!r} in os.environ) and "
            "__import__('safe_redirect.bootstrap').bootstrap.process_startup()\n")


@dataclass(frozen=True)
class AttachInfo:
    """What a spawned process needs to write into its master's segment."""

    segment: str
    master_pid: int
    master_start_us: int
    mode: str
    streams: tuple[str, ...]
    overflow: str
    stall_timeout: float
    terminal_fds: tuple[int, int] = (-1, -1)  # fd mode: the master's saved fds 1 and 2
    version: int = 1

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> AttachInfo:
        fields = json.loads(raw)
        if fields.get("version") != 1:
            raise ValueError(f"{ENV_VAR} of an unknown version: {raw[:80]!r}")
        fields["streams"] = tuple(fields["streams"])
        fields["terminal_fds"] = tuple(fields.get("terminal_fds", (-1, -1)))
        return cls(**fields)


def export(info: AttachInfo) -> str | None:
    """Set the variable for processes spawned from now on; returns the value it replaced."""
    hand_over_to_forkserver_children()
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = info.encode()
    return previous


def unexport(info: AttachInfo, previous: str | None) -> None:
    """Put back what `export` replaced, unless somebody changed the variable since."""
    if os.environ.get(ENV_VAR) != info.encode():
        return
    if previous is None:
        del os.environ[ENV_VAR]
    else:
        os.environ[ENV_VAR] = previous


def forkserver_pid() -> int | None:
    """The pid of this process's multiprocessing forkserver, if one runs."""
    forkserver = sys.modules.get("multiprocessing.forkserver")
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


#: How multiprocessing starts its forkserver: `python [flags] -c "...from multiprocessing.forkserver
#: import main; main(...)" [args]` (3.11: the command starts so; 3.14: `import sys; ` comes first,
#: and the parent's arguments follow the command).
FORKSERVER_IMPORT = "from multiprocessing.forkserver import main"
#: The key of the hand-over in the preparation data of a forkserver request.
HAND_OVER_KEY = "safe_redirect_attach"
#: What the forkserver's child runs as it unpickles its request. Plain source for `exec`, so that
#: unpickling never fails: the forkserver may have been started where safe_redirect is not
#: importable, and an exception there would kill the child before the user's target ran.
_ADOPT_SOURCE = """\
try:
    from safe_redirect.bootstrap import adopt
except ImportError:
    pass
else:
    adopt(raw)
"""


def is_forkserver() -> bool:
    """Whether this interpreter is a multiprocessing forkserver, known from its command line
    (already set when a `.pth` runs: `sys.argv` is `["-c", ...]`, `sys.orig_argv` holds the
    command)."""
    argv: list[str] = getattr(sys, "argv", [])
    orig_argv: list[str] = getattr(sys, "orig_argv", [])
    if argv[:1] != ["-c"] or "-c" not in orig_argv[1:]:
        return False
    command = orig_argv.index("-c", 1) + 1
    return command < len(orig_argv) and FORKSERVER_IMPORT in orig_argv[command]


class _HandOver:
    """Rides in the preparation data of each forkserver request: the requesting process's
    SAFE_REDIRECT_ATTACH (None when no session is exported) at the moment of the request.

    A forkserver is one long-lived process; it may have started before `install()`, or under a
    session that has ended since. So it attaches to nothing itself, and each child it forks
    decides by this value: unpickling the request (before `prepare()` and the user's target) runs
    `bootstrap.adopt`. Spawn children get the same from their environment and are left alone."""

    def __init__(self, raw: str | None) -> None:
        self.raw = raw

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        from multiprocessing.context import get_spawning_popen

        if getattr(get_spawning_popen(), "method", None) != "forkserver":
            return (type(None), ())
        return (exec, (_ADOPT_SOURCE, {"raw": self.raw}))


def hand_over_to_forkserver_children() -> None:
    """From now on, every forkserver request of this process (and of its forks) carries the
    session exported at that moment. Idempotent; stays for the life of the process, since a
    forkserver outlives sessions. multiprocessing pickles `spawn.get_preparation_data(name)`
    into each request (popen_forkserver._launch) and has no other hook."""
    import multiprocessing.spawn as mp_spawn

    original = mp_spawn.get_preparation_data
    if getattr(original, "_safe_redirect_hand_over", False):
        return

    def get_preparation_data(*args: Any, **kwargs: Any) -> dict[str, object]:
        data: dict[str, object] = original(*args, **kwargs)
        data[HAND_OVER_KEY] = _HandOver(os.environ.get(ENV_VAR))
        return data

    get_preparation_data._safe_redirect_hand_over = True  # type: ignore[attr-defined]
    get_preparation_data.__wrapped__ = original  # type: ignore[attr-defined]
    mp_spawn.get_preparation_data = get_preparation_data


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"]]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # some embedded interpreters
        pass
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs))


def ensure_pth() -> str | None:
    """The path of our `.pth` in this interpreter's site-packages, written there if missing.
    None when no site directory is writable: spawned processes then run uncaptured."""
    dirs = _site_dirs()
    for directory in dirs:
        path = os.path.join(directory, PTH_NAME)
        try:
            with open(path) as existing:
                if existing.read() == PTH_LINE:
                    return path
        except OSError:
            continue
    for directory in dirs:
        path = os.path.join(directory, PTH_NAME)
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w") as out:
                out.write(PTH_LINE)
            os.replace(temporary, path)
            return path
        except OSError:
            try:
                os.unlink(temporary)
            except OSError:
                pass
    return None
