"""Learning-rate schedules of a run and the budget resolved from epochs.

* ``cosine``: linear warm-up, then cosine decay to 0.1x at ``max_steps`` (the original schedule; it ties
  the rate to a guessed step budget, which favours whichever variant converges at that budget);
* ``constant``: linear warm-up, then constant;
* ``plateau``: linear warm-up, then constant times ``scale``; every validation that does not improve
  multiplies ``scale`` by ``train.plateau_factor``. The same scale is applied to the dense AdamW rate and
  to the fused sparse Adagrad rate (``engram.sparse_lr``), so the memories cool down with the dense part.
  ``scale`` lives in the loop state, so it is checkpointed and restored on resume.
"""
from __future__ import annotations

import math

from comeir_dist.config.run import RunConfig


def lr_factor(step: int, warmup: int, total: int, kind: str = "cosine", scale: float = 1.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup * scale
    if kind != "cosine":
        return scale
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_budget(cfg: RunConfig, n_samples: int) -> RunConfig:
    """A copy of ``cfg`` whose ``max_steps`` / ``eval_every`` come from ``max_epochs`` / ``eval_every_epochs``
    (when set) and the number of training samples; the resolved values are what checkpoints record.
    With ``engram.reinit_every_epoch`` validation falls on epoch ends (patience kept in epochs)."""
    tc = cfg.train
    if tc.max_epochs is None and tc.eval_every_epochs is None:
        return cfg
    steps_per_epoch = n_samples / tc.batch_size
    out = cfg.model_copy(deep=True)
    if tc.max_epochs is not None:
        out.train.max_steps = max(1, math.ceil(tc.max_epochs * steps_per_epoch))
    if tc.eval_every_epochs is not None:
        out.train.eval_every = max(1, round(tc.eval_every_epochs * steps_per_epoch))
        if cfg.engram.reinit_every_epoch:
            # tables that start over every epoch are only complete at an epoch's end: validate there, with the
            # same patience in epochs (e.g. every 0.5 epoch x 4 -> every epoch x 2)
            every = max(1, round(tc.eval_every_epochs))
            out.train.eval_every = every * math.ceil(n_samples / tc.batch_size)
            out.train.patience = max(1, math.ceil(tc.patience * tc.eval_every_epochs / every))
    return out


class PlateauScale:
    """The mutable ``scale`` of the ``plateau`` schedule (read by the dense LambdaLR at every step)."""

    def __init__(self, kind: str, factor: float, scale: float = 1.0):
        self.kind, self.factor, self.scale = kind, factor, scale

    def after_validation(self, improved: bool) -> bool:
        """Update after a validation; returns whether the scale changed."""
        if self.kind != "plateau" or improved:
            return False
        self.scale *= self.factor
        return True
