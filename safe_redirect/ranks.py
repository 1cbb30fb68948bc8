"""What launchers tell us about ranks: the environment, torch.multiprocessing.spawn, torch_xla.

A rank is normally a property of a process (RANK, LOCAL_RANK, the rank argument of
torch.multiprocessing.spawn). torch_xla on the CPU, and on some TPU generations, runs its ranks as
threads of one process: there the rank is a property of the writing thread, carried in each record
(`set_thread_rank`). torch_xla is watched, not imported: when its runtime module loads, the function
that xmp.spawn calls in every rank thread before the user's function is wrapped to set it.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

from safe_redirect import ring
from safe_redirect.import_hooks import when_imported

__all__ = ["detect_rank", "set_thread_rank", "watch_torch_xla"]

_RANK_VARIABLES = ("RANK", "LOCAL_RANK")


def _torch_spawn_rank() -> int | None:
    """torch.multiprocessing.spawn passes the rank as an argument, not in the environment: its
    children run `_wrap(fn, rank, args, error_file)` as their Process target."""
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is None:
        return None
    process = multiprocessing.current_process()
    target = getattr(process, "_target", None)
    if getattr(target, "__module__", "") != "torch.multiprocessing.spawn":
        return None
    args: tuple[object, ...] = tuple(getattr(process, "_args", ()))
    rank = args[1] if len(args) > 1 else None
    return rank if isinstance(rank, int) else None


def detect_rank(thread: bool = True) -> int | None:
    """The rank the launcher gave this process: RANK, LOCAL_RANK, the rank argument of
    torch.multiprocessing.spawn, or (with `thread`) the calling thread's torch_xla ordinal."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    rank = _torch_spawn_rank()
    if rank is not None or not thread:
        return rank
    return _xla_ordinal(process=True)


def _xla_ordinal(process: bool = False) -> int | None:
    """This thread's torch_xla ordinal, if torch_xla is loaded and its runtime already running.
    Asking earlier would start the runtime, and xmp.spawn refuses to run after that. With
    `process`: None where the process drives several devices, one rank thread each (the CPU, some
    TPUs): the process has no rank of its own there, only its rank threads have."""
    xla = sys.modules.get("torch_xla")
    xla_runtime = sys.modules.get("torch_xla.runtime")
    if xla is None or xla_runtime is None:
        return None
    try:
        if not xla._XLAC._xla_runtime_is_initialized():
            return None
        if process and int(xla_runtime.addressable_runtime_device_count()) > 1:
            return None
        return int(xla_runtime.global_ordinal())
    except Exception:
        return None


def set_thread_rank(rank: int | None) -> None:
    """Tag what the calling thread writes with `rank` (None: with its process's rank)."""
    ring.set_thread_rank(-1 if rank is None else rank)


_XLA_RUNTIME = "torch_xla.runtime"


def _patch_xla_runtime(runtime: ModuleType) -> None:
    original = getattr(runtime, "_init_world_size_ordinal", None)
    if original is None or getattr(original, "_safe_redirect", False):
        return

    def init_world_size_ordinal(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        set_thread_rank(_xla_ordinal())  # this thread's ordinal: its device is set by now
        return result

    init_world_size_ordinal._safe_redirect = True  # type: ignore[attr-defined]
    runtime._init_world_size_ordinal = init_world_size_ordinal  # type: ignore[attr-defined]


def watch_torch_xla() -> None:
    """Tag torch_xla's rank threads by their ordinal, whether torch_xla is loaded yet or not."""
    when_imported(_XLA_RUNTIME, _patch_xla_runtime)
