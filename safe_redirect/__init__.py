"""safe_redirect: console output of multi-process Python that never crashes, hangs, doubles or
vanishes.

    import safe_redirect
    with safe_redirect.install(on_output=print_somewhere) as h:
        ...fork workers...
"""

from safe_redirect.drain import Record
from safe_redirect.launchers import set_thread_rank
from safe_redirect.session import MODES, OVERFLOW_POLICIES, Session, Stats, install, stats

__all__ = [
    "MODES", "OVERFLOW_POLICIES", "Record", "Session", "Stats", "install", "patch_wandb",
    "set_thread_rank", "stats", "unpatch_wandb",
]


def patch_wandb() -> None:
    """Swap wandb's console redirect classes for fork-safe ones; idempotent."""
    from safe_redirect.integrations.wandb import patch_wandb as patch

    patch()


def unpatch_wandb() -> None:
    """Put wandb's own console redirect classes back."""
    from safe_redirect.integrations.wandb import unpatch_wandb as unpatch

    unpatch()
__version__ = "0.1.0"
