"""All-position teacher forcing of autoregressive SID decoding (``train.sample_mode: sequence``) in one backbone pass.

Normal GR (code_decoder.py) reads code 1 of the target at the last history input and feeds codes 1..L-1 back after
the history. Over a window of N items every position j is such a prefix sample (history = items 0..j, target =
item j+1). One pass computes all of them: the window's inputs, then for every position its L-1 fed-back codes, under
a block mask:

* an input token sees the real input tokens up to itself (causal, as in prefix training);
* the fed-back code f of position j sees the input tokens of items 0..j and the fed-back codes 0..f of position j
  (never those of another position, which belong to another prefix sample);
* positions count real tokens from the window's first one; fed-back code f of position j sits at the position of
  item j's last input + 1 + f, where the prefix sample puts it.

So the level-l logits at position j equal the prefix sample's (tested). tm (and comeir's decoder head) feed one input
per item; flatten's plain mode (flatten_sequence.py) needs no fed-back tokens: its inputs ARE the codes. comeir's
memory head reads no fed-back codes: comeir_sequence.py.
"""
from __future__ import annotations

import torch
from torch import nn

from comeir_dist.model.backbone import attention_mask_for
from comeir_dist.model.loss import sid_token_losses


def block_structure(items: int, per_item: int, fed: int, device=None) -> torch.Tensor:
    """``[S, S]`` bool (query, key) of the layout ``[inputs (items x per_item); fed (items x fed)]``."""
    t = items * per_item
    item_of_input = torch.arange(t, device=device) // per_item
    pos_j = torch.arange(items, device=device).repeat_interleave(fed)  # the position a fed-back code belongs to
    slot = torch.arange(fed, device=device).repeat(items)
    ii = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    fi = item_of_input.unsqueeze(0) <= pos_j.unsqueeze(1)
    ff = (pos_j.unsqueeze(1) == pos_j.unsqueeze(0)) & (slot.unsqueeze(0) <= slot.unsqueeze(1))
    top = torch.cat([ii, torch.zeros(t, items * fed, dtype=torch.bool, device=device)], dim=1)
    return torch.cat([top, torch.cat([fi, ff], dim=1)], dim=0)


def all_position_states(backbone: nn.Module, x: torch.Tensor, valid: torch.Tensor, per_item: int,
                        fed: torch.Tensor) -> list[torch.Tensor]:
    """Backbone states ``[B, N, d]`` that score level 0..L-1 at every position: ``x [B, N*per_item, d]`` the window's
    inputs (left-padded, ``valid [B, N*per_item]``), ``fed [B, N, L-1, d]`` the fed-back codes of each position's
    target. Level 0 is read at item j's last input, level l at its fed-back code l-1."""
    b, t, d = x.shape
    n, nfed = fed.shape[1], fed.shape[2]
    struct = block_structure(n, per_item, nfed, x.device)
    item_valid = valid[:, per_item - 1::per_item]  # [B, N]: an item is real iff its last input is
    key_valid = torch.cat([valid, item_valid.repeat_interleave(nfed, dim=1)], dim=1)  # [B, S]
    eye = torch.eye(struct.shape[0], dtype=torch.bool, device=x.device)
    mask4 = ((struct.unsqueeze(0) & key_valid.unsqueeze(1)) | eye).unsqueeze(1)  # [B, 1, S, S]
    tokens = torch.cat([x, fed.reshape(b, n * nfed, d)], dim=1)
    mask4 = attention_mask_for(backbone, mask4, tokens.dtype)
    pos_in = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    last = pos_in[:, per_item - 1::per_item]  # [B, N]: position of item j's last input
    pos_fed = last.unsqueeze(-1) + 1 + torch.arange(nfed, device=x.device)  # [B, N, L-1]
    pos = torch.cat([pos_in, pos_fed.reshape(b, -1)], dim=1)
    h = backbone(inputs_embeds=tokens, attention_mask=mask4, position_ids=pos).last_hidden_state
    fed_h = h[:, t:].reshape(b, n, nfed, d)
    return [h[:, per_item - 1:t:per_item]] + [fed_h[:, :, f] for f in range(nfed)]


def window_code_loss(model, states: list[torch.Tensor], codes: torch.Tensor, sel: torch.Tensor, width: int,
                     bf16: bool = False) -> torch.Tensor:
    """Eq. 12 at every real target of every window from backbone ``states`` ``[B, N, d]`` per level scored by
    ``model.out`` (flatten, tm, comeir's decoder head); ``codes [B, N, L]`` the targets' codes, ``sel [B, N]`` the
    real targets. See :func:`window_loss`."""
    rows, _ = sel.nonzero(as_tuple=True)
    logits = []
    for level, h in enumerate(states):
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits.append(model.out[level](h[sel]))
    return window_loss(logits, codes[sel], rows, sel.shape[0], width, model.trie)


def window_loss(logits: list[torch.Tensor], tgt: torch.Tensor, rows: torch.Tensor, windows: int, width: int,
                trie) -> torch.Tensor:
    """The catalog-constrained loss (Eq. 12 with the Eq. 11 masks) of P targets, ``logits [P, C]`` per level,
    ``tgt [P, L]`` their codes, ``rows [P]`` their window. Normalised like SASRec's all-position loss: per window the
    SUM over its targets divided by the window width, then the mean over the ``windows`` (1..N ranks compute the same
    loss; a window weighs its targets like the prefix samples they replace)."""
    ce = sid_token_losses(logits, tgt, trie)
    per_window = ce.new_zeros(windows).index_add(0, rows, ce)
    return (per_window / width).mean()
