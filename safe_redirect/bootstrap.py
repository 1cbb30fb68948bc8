"""What the `.pth` runs at the start of every interpreter where SAFE_REDIRECT_ATTACH or
SAFE_REDIRECT_PATCH is set.

Kept tiny and idempotent (a `.pth` may be processed twice): patch what SAFE_REDIRECT_PATCH names
when it is imported, and attach this process's streams to the master's segment. It never raises:
a process must start even when its master is gone. A multiprocessing forkserver's children attach
here too, per request (`adopt`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from safe_redirect.diagnostics import warn

if TYPE_CHECKING:
    from safe_redirect.session import Session

__all__ = ["adopt", "process_startup"]

_attached: Session | None = None
_member: Session | None = None  # this process's membership of a job (job.py)
_patched = False


def _apply_patches(names: str) -> None:
    """SAFE_REDIRECT_PATCH=wandb: patch wandb as soon as it is imported, in this process."""
    from safe_redirect.import_hooks import when_imported

    for name in filter(None, (n.strip() for n in names.split(","))):
        if name != "wandb":
            warn(f"safe_redirect: SAFE_REDIRECT_PATCH: unknown name {name!r}")
            continue

        def patch(_module: object) -> None:
            from safe_redirect.integrations.wandb import patch_wandb

            patch_wandb()

        when_imported("wandb", patch)


def process_startup() -> object | None:
    """Apply SAFE_REDIRECT_PATCH, attach to the master named in SAFE_REDIRECT_ATTACH; the
    attached Session, or None. A forkserver attaches to nothing (see `adopt`)."""
    global _patched
    from safe_redirect.spawn import ENV_VAR, PATCH_VAR, is_forkserver

    if not _patched and os.environ.get(PATCH_VAR):
        _patched = True
        try:
            _apply_patches(os.environ[PATCH_VAR])
        except Exception as exc:
            warn(f"safe_redirect: {PATCH_VAR}: {exc!r}")
    if _attached is not None:
        return _attached
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return _join_job() if not is_forkserver() else None
    if is_forkserver():
        _leave_the_masters_pipes(raw)
        _import_for_children()
        return None
    attached = _attach(raw)
    # a rank of a job started under a master (`safe-redirect run --wandb -- torchrun ...`):
    # its lines go to both, the master's capture and the run that rank 0 opens
    _join_job()
    return attached


def _join_job() -> Session | None:
    """One rank of a launcher's job (RANK and WORLD_SIZE set) under SAFE_REDIRECT_PATCH, or a
    process a member started (SAFE_REDIRECT_JOB set): a member of the job's segment, so that
    the rank that opens the run receives its lines (`job.py`)."""
    global _member
    from safe_redirect.spawn import JOB_VAR, PATCH_VAR

    env = os.environ
    launched = env.get(PATCH_VAR) and env.get("RANK") and env.get("WORLD_SIZE")
    if _member is not None or not (env.get(JOB_VAR) or launched):
        return _member
    try:
        from safe_redirect.session import join_job

        _member = join_job()
    except Exception as exc:
        warn(f"safe_redirect: could not join the job's capture: {exc!r}")
        return None
    return _member


def adopt(raw: str | None) -> None:
    """In a child of a forkserver, as it unpickles its request (before `prepare()` and the user's
    target): attach to the session the requesting process had exported then (`raw`), or to none.
    The environment follows, so that the child's own spawned processes do the same. Never
    raises: an exception here would kill the child."""
    global _attached
    from safe_redirect.spawn import ENV_VAR

    try:
        if raw is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = raw
        stale = _attached
        if stale is not None and stale.attach_info.encode() != raw:
            _attached = None
            stale.uninstall()
        if raw and _attached is None:
            _attach(raw)
    except Exception as exc:
        warn(f"safe_redirect: a forkserver child could not attach: {exc!r}")


def _attach(raw: str) -> Session | None:
    global _attached
    from safe_redirect.spawn import AttachInfo, hand_over_to_forkserver_children

    try:
        from safe_redirect.session import Session

        hand_over_to_forkserver_children()  # a forkserver of this process's own
        _attached = Session.attach(AttachInfo.decode(raw))
    except OSError:
        return None  # the master uninstalled or died, or its terminal cannot be shared
    except Exception as exc:
        warn(f"safe_redirect: could not attach to the master: {exc!r}")
        return None
    return _attached


def _leave_the_masters_pipes(raw: str) -> None:
    """A forkserver started under an fd-mode session holds the master's pipes on fds 1 and 2, and
    its children would inherit them: point them at the master's terminal, as an attaching
    process does, and capture nothing here."""
    from safe_redirect.spawn import AttachInfo

    try:
        info = AttachInfo.decode(raw)
        if info.mode == "fd":
            from safe_redirect.procfs import reopen_terminal

            reopen_terminal(info.master_pid, info.terminal_fds, info.streams)
    except Exception:
        pass  # fds 1 and 2 stay on the master's pipes: the output is still captured, untagged


def _import_for_children() -> None:
    """A forkserver imports what its children attach with, once: each child inherits it instead
    of importing it again (measured: about 200 ms per child otherwise)."""
    try:
        import safe_redirect.session  # noqa: F401
    except Exception:
        pass
