"""All-position training of ComeIR (``train.sample_mode: sequence``): one encoder and backbone pass per window.

ComeIR's input vector of item n depends on items n-w+1..n only (Eq. 4-7: the token scoring is per item, the Engram
keys are n-grams ending at n, the inter query attends a window ending at n: comeir_encoder.py), and the backbone is
causal, so one pass over a window gives every position j the encoder outputs and the user state h_u of the prefix
sample (window[:j+1], target j). The memory-restoring head (Eq. 10, 23-27) of position j reads what that prefix
sample's head reads: h_u at j, s^0 and the mask of the last ``window`` items up to j (Eq. 25) and the last o-1
history units up to j (the inter keys, Eq. 24). :class:`PositionViews` cuts those per target from the window's
tensors (left-padded, the last column = position j), so the head runs once over the P real targets of the batch,
each as its own row, with the keys of the encoder and of every level's head in ONE Engram lookup (as in prefix
training). Every target's logits equal its prefix sample's (tested); the loss is code_sequence.window_loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from comeir_dist.model.backbone import run_backbone
from comeir_dist.model.code_sequence import all_position_states, window_code_loss, window_loss
from comeir_dist.model.history import HistoryBatch
from comeir_dist.model.sasrec import trim_left_padding


class PositionViews:
    """For P targets at (window ``b``, position ``j``): the ``width`` positions up to and including j of a window
    tensor ``[B, N, ...]``, left-padded with zeros (False for masks) where they fall before the window."""

    def __init__(self, b: torch.Tensor, j: torch.Tensor, width: int):
        self.b, self.width = b, width
        self.idx = j.unsqueeze(1) + torch.arange(width, device=j.device)  # into the left-padded tensor

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        pad = [0, 0] * (t.dim() - 2) + [self.width - 1, 0]
        return F.pad(t, pad)[self.b.unsqueeze(1), self.idx]


def comeir_sequence_loss(model, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
    """``batch.items [B, N]`` window inputs and ``batch.target [B, N]`` the next item at every position (-1 = none),
    left-padded alike; ``model`` a :class:`comeir_dist.model.comeir.ComeIRModel` with Normal GR decoding."""
    width = batch.items.shape[1]
    items, target = trim_left_padding(batch.items, batch.target)
    sel = target >= 0
    codes = model.catalog.item_codes(target)  # [B, N, L]
    levels = model.levels
    if model.head is None:  # head: decoder -- tm's block-masked pass over R^I and the fed-back codes
        with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=bf16):
            enc = model.encoder_pass(items)
            fed = model.tokens(codes[:, :, : levels - 1])
            states = all_position_states(model.backbone, enc["r"], enc["mask"], 1, fed)
        return window_code_loss(model, states, codes, sel, width, bf16)
    b, j = sel.nonzero(as_tuple=True)
    tgt = codes[b, j]  # [P, L]
    orders = [o for l in range(1, levels + 1) for o in model.lookup.orders("inter", l)]
    view = PositionViews(b, j, max([model.head.window, 1] + [o - 1 for o in orders]))

    def requests(lp, units, mask):
        rows_units, rows_mask = [view(u) for u in units], view(mask)
        reqs = []
        for level in range(levels):
            prefix = tgt[:, :level]
            valid = model.trie.valid_mask(prefix, level=level).unsqueeze(1)
            fold = None if lp.fold is None else lp.fold.index_select(0, b)  # a target's fold is its window's
            reqs.append(model.head.request(lp, level + 1, prefix.unsqueeze(1), valid, rows_units, rows_mask, fold))
        return reqs

    with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=bf16):
        enc = model.encoder_pass(items, requests)
        h, _ = run_backbone(model.backbone, enc["r"], enc["mask"])
        zeta, s0, mask = h[b, j], view(enc["s0"]), view(enc["mask"])
        logits = [model.head.logits(enc["lp"], req, zeta, s0, mask, model.tokens.level_table(req.level - 1))[:, 0]
                  for req in enc["extra"]]
    return window_loss(logits, tgt, b, sel.shape[0], width, model.trie)
