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
    "MODES", "OVERFLOW_POLICIES", "Record", "Session", "Stats", "install", "set_thread_rank",
    "stats",
]
__version__ = "0.1.0"
