"""The library's own messages to the user: one channel, straight to fd 2.

A warning of ours (a timeout, a lane miss, a callback that raised) must reach the user even while
our capture is broken or half set up, and must never make things worse: it never goes through
`sys.stderr` (no hook of ours or anyone's re-entered, nothing for a wandb callback to echo), never
raises into the code that reports, and cannot fail on text the terminal's encoding lacks. In fd
mode fd 2 is this process's pipe: the message is captured there like any other write to fd 2.
"""

from __future__ import annotations

import os

__all__ = ["warn"]


def warn(message: str) -> None:
    """Write `message` to fd 2 as one line (UTF-8, unencodable characters escaped); never
    raises."""
    data = (message.rstrip("\n") + "\n").encode("utf-8", "backslashreplace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass
