"""`import safe_redirect.wandb`: the import-time monkeypatch, `safe_redirect.patch_wandb()` done."""

from safe_redirect.integrations.wandb import patch_wandb, unpatch_wandb

__all__ = ["patch_wandb", "unpatch_wandb"]

patch_wandb()
