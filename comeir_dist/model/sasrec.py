"""SASRec item-ID baseline (``model.variant: sasrec``; Kang & McAuley 2018, trained as in Ding et al.,
"How Well Does Generative Recommendation Generalize?": cross-entropy over ALL items, no sampled negatives).

One token per history item: a learned item embedding (row ``I`` = padding), input dropout
(``model.backbone.dropout``), the causal backbone of every variant (``backbone.build_backbone`` /
``run_backbone``: left-padded inputs, positions counting real items only), and the last state ``h_u``
scored against every item embedding (tied input/output table, as SASRec): ``logits = h_u E^T`` ``[B, I]``.

No SIDs, no trie, no Engram tables (no ``tables`` attribute: the loop, checkpoints and ``comeir plan`` take the
table-less path of flatten / tm). The training samples are the loop's (every prefix of every training
sequence, the next item as target), so the loss is the next-item cross-entropy at the last position.

Evaluation ranks all items (``ranks_all_items``): ``eval.ranking.rank_scores`` turns the logits into the same
``P`` / ``G`` as the SID path (items scored strictly higher / tied with the target); nothing is excluded
(the SID beam search excludes nothing either).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comeir_dist.model.backbone import backbone_width, run_backbone
from comeir_dist.model.history import HistoryBatch


class ItemTable(nn.Module):
    """The item embeddings ``[I + 1, d]`` (row ``I``: padding, kept at 0), used for the inputs AND the output
    scores. Both uses go through ``forward`` so that DeepSpeed ZeRO-3 gathers the (partitioned) table for each."""

    def __init__(self, num_items: int, dim: int, init_std: float = 0.02):
        super().__init__()
        self.num_items = int(num_items)
        self.weight = nn.Parameter(torch.empty(self.num_items + 1, dim))  # on the meta device under `comeir plan`
        if not self.weight.is_meta:
            with torch.no_grad():
                self.weight.normal_(0.0, init_std)
                self.weight[self.num_items].zero_()

    def forward(self, x: torch.Tensor, scores: bool = False) -> torch.Tensor:
        if scores:  # x: hidden states [..., d] -> logits over the catalog [..., I]
            return x @ self.weight[: self.num_items].t().to(x.dtype)
        idx = torch.where(x >= 0, x, torch.full_like(x, self.num_items))  # -1 padding -> row I
        return F.embedding(idx, self.weight, padding_idx=self.num_items)


class SASRecModel(nn.Module):
    variant = "sasrec"
    ranks_all_items = True  # evaluation scores the whole catalog (eval.evaluate) instead of SID beam search
    trie = None  # no SIDs: nothing to constrain or to move to the device

    def __init__(self, num_items: int, backbone: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.num_items = int(num_items)
        self.items = ItemTable(num_items, backbone_width(backbone))
        self.dropout = nn.Dropout(dropout)

    def user_state(self, batch: HistoryBatch) -> torch.Tensor:
        """``h_u [B, d]``: the backbone's state at the most recent history item (all-padding leading columns
        trimmed: a batch of short histories does not pay for max_history)."""
        (items,) = trim_left_padding(batch.items)
        h, _ = run_backbone(self.backbone, self.dropout(self.items(items)), items >= 0)
        return h[:, -1]

    def item_logits(self, batch: HistoryBatch) -> torch.Tensor:
        """Next-item logits over the whole catalog ``[B, I]``."""
        return self.items(self.user_state(batch), scores=True)

    def training_loss(self, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
        """Mean next-item cross-entropy over all items (the model-defined loss the training loop runs;
        see ``parallel.dense.training_loss``). bf16 autocast for the forward, the softmax in fp32. A target
        ``[B, N]`` (``train.sample_mode: sequence``) is the next item at every position (:func:`sequence_loss`)."""
        if batch.target.dim() == 2:
            return self.sequence_training_loss(batch, bf16)
        with torch.autocast(batch.items.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = self.item_logits(batch)
        return F.cross_entropy(logits.float(), batch.target)

    def sequence_training_loss(self, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
        """All-position training: the causal state at every input position scores the next item."""
        items, target = trim_left_padding(batch.items, batch.target)
        with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=bf16):
            h, _ = run_backbone(self.backbone, self.dropout(self.items(items)), items >= 0)
        return self.sequence_loss(h, target, batch.items.shape[1], bf16)

    def sequence_loss(self, h: torch.Tensor, target: torch.Tensor, width: int, bf16: bool = False) -> torch.Tensor:
        """``h [B, N, d]`` (the state at every input position) vs ``target [B, N]`` (-1 = no target): per sample
        the SUM of its positions' cross-entropies over all items divided by the window ``width`` (a constant:
        trimming does not change the loss), then the mean over samples -- positions weigh equally within a batch
        and, like every loss of the loop, it is a mean over samples, so 1..N ranks compute the same loss. Only the
        positions with a target are scored (``[P, I]`` logits, not ``[B, N, I]``)."""
        sel = target >= 0
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = self.items(h[sel], scores=True)
        ce = F.cross_entropy(logits.float(), target[sel], reduction="none")
        rows = torch.arange(target.shape[0], device=target.device).unsqueeze(1).expand_as(target)[sel]
        per_sample = ce.new_zeros(target.shape[0]).index_add(0, rows, ce)
        return (per_sample / width).mean()


def trim_left_padding(items: torch.Tensor, *others: torch.Tensor):
    """Drop the leading columns that are padding in every row (left-padded rows: nothing real moves, positions
    count real items), so a batch of short windows does not pay for the longest possible one."""
    real = (items >= 0).any(0)
    first = int(real.nonzero()[0]) if bool(real.any()) else items.shape[1] - 1
    return (items[:, first:],) + tuple(o[:, first:] for o in others)

