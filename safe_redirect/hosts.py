"""Hosts that own the streams we hook: a Jupyter kernel (ipykernel, IPython), what they do to our
hooks, and what the hooks do about it.

- IPython 9 wraps `sys.stdout.write` / `sys.stderr.write` for each cell (`InteractiveShell._tee`)
  and, when the cell ends, puts back the writer it found when the cell started: a hook installed
  during the cell is dropped. ipykernel flushes both streams after every cell, once that is done,
  so the hooks re-arm there (`hooks.rearm`, called before the flush).
- ipykernel's `OutStream` moves fds 1 and 2 to pipes and echoes what arrives there with a thread
  of its own (`watch_fd_thread`) through `OutStream.write`: a spawned child's line, which the
  child already wrote into its lane. The hooks pass that thread's writes on without capturing them.
- `OutStream` sends what the kernel prints (and its forked children print) over ZeroMQ, never
  through fds 1 and 2: fd capture alone does not see it.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["fd_echo_thread", "in_ipython", "is_kernel_stream", "uncaptured_in_kernel"]

_noted = False  # the note on what a kernel keeps from fd mode is said once per process


def in_ipython() -> bool:
    """True inside a running IPython shell (a kernel, or the terminal IPython)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    try:
        return get_ipython is not None and get_ipython() is not None
    except Exception:  # a half-imported or unusual IPython: not a host we know
        return False


def is_kernel_stream(stream: Any) -> bool:
    """True for ipykernel's `OutStream` (the kernel's sys.stdout / sys.stderr)."""
    iostream = sys.modules.get("ipykernel.iostream")
    out_stream = getattr(iostream, "OutStream", None)
    return isinstance(out_stream, type) and isinstance(stream, out_stream)


def fd_echo_thread(stream: Any) -> int:
    """Ident of the kernel's thread that echoes fd 1 or 2 through `stream.write` (0: none)."""
    if not is_kernel_stream(stream):
        return 0
    thread = getattr(stream, "watch_fd_thread", None)
    if not isinstance(thread, threading.Thread) or not thread.is_alive():
        return 0
    return thread.ident or 0


def uncaptured_in_kernel(mode: str, streams: tuple[str, ...], python_writes_hooked: bool) -> str:
    """What a session in `mode` cannot capture in this kernel, said once per process ("" when
    nothing, or said before)."""
    global _noted
    if _noted or mode != "fd" or python_writes_hooked:
        return ""
    if not any(is_kernel_stream(getattr(sys, name, None)) for name in streams):
        return ""
    _noted = True
    return ("safe_redirect: mode='fd' (wandb: console='redirect') in a Jupyter kernel captures "
            "only what reaches fds 1 and 2: spawned processes, C libraries, os.write, "
            "subprocesses. print() and sys.stdout/sys.stderr writes of this kernel and of its "
            "forked children go to the kernel's own streams and are NOT captured; use "
            "mode='wrap' (wandb: console='wrap') to capture them.")
