"""safe_redirect: console output of multi-process Python that never crashes, hangs, doubles or
vanishes.

    import safe_redirect
    with safe_redirect.install(on_output=print_somewhere) as h:
        ...fork workers...

The names below load on first use (PEP 562): the pytest plugin imports this package in every
pytest process, which should not pay for the ring, psutil and the drain until a test captures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safe_redirect.ranks import set_thread_rank
    from safe_redirect.record import Record
    from safe_redirect.session import (
        MODES,
        OVERFLOW_POLICIES,
        Session,
        Stats,
        install,
        join_job,
        stats,
    )

__all__ = [
    "MODES", "OVERFLOW_POLICIES", "Record", "Session", "Stats", "install", "join_job",
    "patch_wandb", "set_thread_rank", "stats", "unpatch_wandb",
]
__version__ = "0.1.0"

_LAZY = {
    "Record": "safe_redirect.record",
    "set_thread_rank": "safe_redirect.ranks",
    **dict.fromkeys(("MODES", "OVERFLOW_POLICIES", "Session", "Stats", "install", "join_job",
                     "stats"),
                    "safe_redirect.session"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safe_redirect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def patch_wandb() -> None:
    """Swap wandb's console redirect classes for fork-safe ones; idempotent."""
    from safe_redirect.integrations.wandb import patch_wandb as patch

    patch()


def unpatch_wandb() -> None:
    """Put wandb's own console redirect classes back."""
    from safe_redirect.integrations.wandb import unpatch_wandb as unpatch

    unpatch()
