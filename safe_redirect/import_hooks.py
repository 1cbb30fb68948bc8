"""Run a function when a module is imported, whoever imports it and whenever.

Used to patch third-party modules (torch_xla's runtime, wandb) that may be imported before or after
safe_redirect: patched at once if loaded, else right after they execute.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["when_imported"]

_pending: dict[str, list[Callable[[ModuleType], None]]] = {}


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it asks the other finders, and wraps the loader of a watched module
    so that the callbacks run right after the module has executed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module = _then_run(  # type: ignore[method-assign]
                    spec.loader.exec_module, _pending.pop(fullname))
                return spec
        return None


def _then_run(exec_module: Any, callbacks: list[Callable[[ModuleType], None]]) -> Any:
    def exec_and_run(module: ModuleType) -> None:
        exec_module(module)
        for callback in callbacks:
            callback(module)

    return exec_and_run


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """`callback(module)` now if `name` is loaded, else right after it is first imported."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    callbacks = _pending.setdefault(name, [])
    if callback not in callbacks:
        callbacks.append(callback)
    if not any(isinstance(finder, _Watcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())
