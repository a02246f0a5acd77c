"""All-position training of flatten (``train.sample_mode: sequence``): one causal pass per window.

Flatten's input is the history's SID tokens in order, and its Normal GR decoding reads code 1 of the target at the
last history token and feeds code l back to predict code l+1 (baselines.py). So the teacher-forced pass of the
prefix sample (items ``s[:i+1]``, target ``s[i+1]``) is exactly the first ``(i + 2) * L - 1`` positions of ONE causal
pass over the window's tokens ``s[0] .. s[last]``: the output at token p scores token p + 1 with the output layer of
that token's level. One pass scores every target of the window (SASRec's all-position training applied to SID
tokens, as decoder-only SID generators train), each with the catalog-constrained loss of Eq. 12 (Eq. 11 masks).

The loss is :func:`comeir_dist.model.code_sequence.window_code_loss` (normalised like SASRec's all-position loss).
tm, and flatten with DECOR composition, feed codes that differ from the history tokens: code_sequence.py.
"""
from __future__ import annotations

import torch

from comeir_dist.model.backbone import run_backbone
from comeir_dist.model.code_sequence import window_code_loss
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.sasrec import trim_left_padding


def flatten_sequence_loss(model, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
    """``batch.items [B, N]`` window inputs and ``batch.target [B, N]`` the next item at every position (-1 = none),
    both left-padded alike (:func:`comeir_dist.train.sequence_samples.sequence_windows`); ``model`` is a flatten
    :class:`comeir_dist.model.baselines.GenerativeBaseline` with Normal GR decoding and no composition."""
    width = batch.items.shape[1]
    items, target = trim_left_padding(batch.items, batch.target)
    b, n = items.shape
    levels = model.levels
    # the window's items in order: the inputs, then the last position's target (inputs shift targets by one)
    seq = torch.cat([items, target[:, -1:]], dim=1)  # [B, N+1]
    codes = model.catalog.item_codes(seq)  # [B, N+1, L]
    with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=bf16):
        tok = model.tokens(codes).flatten(1, 2)[:, :-1]  # the last code is only ever a target
        mask = (seq >= 0).repeat_interleave(levels, dim=1)[:, :-1]
        h, _ = run_backbone(model.backbone, tok, mask)
    # level l of the item at sequence position j >= 1 is scored at token j*L + l - 1; item j is target[:, j-1]
    first = torch.arange(1, n + 1, device=h.device) * levels - 1  # [N]: the token scoring code 1 of item j
    states = [h[:, first + level] for level in range(levels)]
    return window_code_loss(model, states, codes[:, 1:], target >= 0, width, bf16)
