"""The body of a forked child in tests: shared by conftest's fork_call and the fault loops."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


def child_exit(body: Callable[[], object]) -> None:
    """Run `body` in a forked child and leave with os._exit: never back into the caller."""
    code = 0
    try:
        body()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
