"""What the `.pth` runs at the start of every interpreter where SAFE_REDIRECT_ATTACH or
SAFE_REDIRECT_PATCH is set.

Kept tiny and idempotent (a `.pth` may be processed twice): patch what SAFE_REDIRECT_PATCH names
when it is imported, and attach this process's streams to the master's segment. It never raises:
a process must start even when its master is gone.
"""

from __future__ import annotations

import os

__all__ = ["process_startup"]

_attached: object | None = None
_patched = False


def _apply_patches(names: str) -> None:
    """SAFE_REDIRECT_PATCH=wandb: patch wandb as soon as it is imported, in this process."""
    from safe_redirect.import_hooks import when_imported

    for name in filter(None, (n.strip() for n in names.split(","))):
        if name != "wandb":
            os.write(2, f"safe_redirect: SAFE_REDIRECT_PATCH: unknown name {name!r}\n".encode())
            continue

        def patch(_module: object) -> None:
            from safe_redirect.integrations.wandb import patch_wandb

            patch_wandb()

        when_imported("wandb", patch)


def process_startup() -> object | None:
    """Apply SAFE_REDIRECT_PATCH, attach to the master named in SAFE_REDIRECT_ATTACH; the
    attached Session, or None."""
    global _attached, _patched
    from safe_redirect.spawn import ENV_VAR, PATCH_VAR, AttachInfo

    if not _patched and os.environ.get(PATCH_VAR):
        _patched = True
        try:
            _apply_patches(os.environ[PATCH_VAR])
        except Exception as exc:
            os.write(2, f"safe_redirect: {PATCH_VAR}: {exc!r}\n".encode())
    if _attached is not None:
        return _attached
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
