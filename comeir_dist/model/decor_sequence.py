"""All-position training with DECOR composition (``train.sample_mode: sequence``, flatten / tm, ``model.decor``).

The fed-back codes of a position's target are composed with that position's context (Eq. 12-18: the history tokens
up to the position, then the generated codes) and, with BOS queries, preceded by the composed BOS input (Eq. 19).
They differ from the static history tokens, so they enter as extra tokens of code_sequence.py's block-masked pass:
every position gets its own L-1 (+ BOS) fed-back inputs, seeing only its own prefix. The pooling statistics of
every position's history come from one cumulative pass (:meth:`DecorComposer.prefix_states`); the composition then
runs once per target, as in prefix training. Every target's logits equal its prefix sample's (tested).
"""
from __future__ import annotations

import torch

from comeir_dist.model.code_sequence import all_position_states, window_code_loss
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.sasrec import trim_left_padding


def composed_sequence_loss(model, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
    """``model`` a flatten / tm :class:`comeir_dist.model.baselines.GenerativeBaseline` with a composer and Normal
    GR decoding; ``batch`` all-position windows (left-padded inputs and next-item targets)."""
    width = batch.items.shape[1]
    items, target = trim_left_padding(batch.items, batch.target)
    sel = target >= 0
    b, j = sel.nonzero(as_tuple=True)
    levels, composer = model.levels, model.composer
    codes = model.catalog.item_codes(target)  # [B, N, L]
    with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=bf16):
        x, mask, _, tok = model._inputs(HistoryBatch(items, target), with_items=False)
        # Eq. 14 over every history TOKEN up to position j (L per item, for tm too): its last token is j*L + L-1
        hist_mask = (items >= 0).repeat_interleave(levels, dim=1)
        st = composer.prefix_states(tok.flatten(1, 2), hist_mask, b, j * levels + levels - 1)
        fed = composer.compose(st, model.tokens(codes[b, j][:, : levels - 1]), model._level_tables())  # [P, L-1, d]
        if composer.bos is not None:  # the composed BOS input first: code 1 is read there (Eq. 19)
            fed = torch.cat([composer.bos_input(st, fed.dtype).unsqueeze(1), fed], dim=1)
        per_position = fed.new_zeros(*sel.shape, *fed.shape[1:])
        per_position[b, j] = fed
        per_item = levels if model.variant == "flatten" else 1
        states = all_position_states(model.backbone, x, mask, per_item, per_position)
    if composer.bos is not None:
        states = states[1:]  # level l is read at the fed input l (BOS = 0), not at the item's last input
    return window_code_loss(model, states, codes, sel, width, bf16)
