"""What the `.pth` runs at the start of every interpreter where SAFE_REDIRECT_ATTACH is set.

Kept tiny and idempotent (a `.pth` may be processed twice): attach this process's streams to the
master's segment, or do nothing at all. It never raises: a process must start even when its master
is gone.
"""

from __future__ import annotations

import os

__all__ = ["process_startup"]

_attached: object | None = None


def process_startup() -> object | None:
    """Attach to the master named in SAFE_REDIRECT_ATTACH; the Session, or None."""
    global _attached
    if _attached is not None:
        return _attached
    from safe_redirect.spawn import ENV_VAR, AttachInfo

    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    try:
        from safe_redirect.session import Session

        _attached = Session.attach(AttachInfo.decode(raw))
    except OSError:
        return None  # the master uninstalled or died, or its terminal cannot be shared
    except Exception as exc:
        try:
            os.write(2, f"safe_redirect: could not attach to the master: {exc!r}\n".encode())
        except OSError:
            pass
        return None
    return _attached
