"""Spawned interpreters join their master through the environment.

A spawned process (multiprocessing spawn or forkserver, `subprocess` running python, and their
children) inherits no Python state, only the environment. The master exports SAFE_REDIRECT_ATTACH
(the segment's name, the master's stamp and the capture options); a `.pth` file in site-packages
runs `safe_redirect.bootstrap.process_startup()` at interpreter start-up, and only when that
variable is set: an unset variable costs one dictionary look-up (coverage.py measures subprocesses
the same way).

The `.pth` is installed with the package's wheel; an editable install ships none, so `install()`
writes it on first use where it is missing (`ensure_pth`).
"""

from __future__ import annotations

import json
import os
import site
import sys
import sysconfig
from dataclasses import asdict, dataclass

__all__ = [
    "ENV_VAR", "PATCH_VAR", "PTH_LINE", "PTH_NAME", "AttachInfo", "ensure_pth", "export",
    "forkserver_pid", "stop_forkserver_started_since", "unexport",
]

ENV_VAR = "SAFE_REDIRECT_ATTACH"
PATCH_VAR = "SAFE_REDIRECT_PATCH"  # "wandb": patch wandb in every process, no code change
PTH_NAME = "safe_redirect.pth"
PTH_LINE = (f"import os; ({ENV_VAR!r} in os.environ or {PATCH_VAR!r} in os.environ) and "
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


def stop_forkserver_started_since(pid_before: int | None) -> None:
    """A forkserver is one long-lived process, spawned with the environment of the moment it
    starts: one started while a session was exported stays attached to that session, and the
    children it forks for a later session would write into a segment that is gone. So the
    session that started it stops it when it ends; the next user starts a fresh one.
    (multiprocessing has no public way; its own tests call `_stop()`.)"""
    pid_now = forkserver_pid()
    if pid_now is None or pid_now == pid_before:
        return
    server = sys.modules["multiprocessing.forkserver"]._forkserver
    stop = getattr(server, "_stop", None)
    if stop is not None:
        stop()


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
