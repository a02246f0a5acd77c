"""The early-stopping decision after one validation.

Two questions are kept apart: which checkpoint is the best (any gain over the best value so far: selection is
unchanged by the options below) and whether training is still improving (the patience counter and the 'plateau'
schedule). By default they agree. ``train.min_delta`` makes the second stricter: a validation improves only when it
beats the value of the last such improvement by more than ``min_delta``, so a run whose rates the plateau schedule has
cut to ~1e-6 cannot creep on with gains of 1e-4 for hundreds of steps. ``train.min_lr_scale`` stops a 'plateau' run
once its learning-rate scale has fallen below it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidationDecision:
    new_best: bool  # save this checkpoint as the best one
    improved: bool  # resets patience; the plateau schedule keeps its rate


def decide(loop: dict, value: float, min_delta: float) -> ValidationDecision:
    """Compare ``value`` with the loop state (``best``; ``ref`` = the value of the last improvement, absent in
    checkpoints written before ``min_delta`` existed, where it equals ``best``) and update ``ref``."""
    ref = loop.get("ref", loop["best"])
    improved = value > ref + min_delta
    if improved:
        loop["ref"] = value
    return ValidationDecision(new_best=value > loop["best"], improved=improved)


def stop_reason(loop: dict, patience: int, lr_scale: float, min_lr_scale: float | None) -> str | None:
    """Why training stops after this validation, or None (``loop['bad']`` = validations since an improvement)."""
    if loop["bad"] >= patience:
        return "early_stopping"
    if min_lr_scale is not None and lr_scale < min_lr_scale:
        return "min_lr"
    return None
