"""Model inputs: a left-padded batch of item histories and the catalog lookups every variant shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HistoryBatch:
    """``items [B, N]`` item indices left-padded with -1 (last column = most recent item); ``target [B]``."""

    items: torch.Tensor
    target: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.items >= 0

    def to(self, device) -> "HistoryBatch":
        return HistoryBatch(self.items.to(device), None if self.target is None else self.target.to(device))


class Catalog(torch.nn.Module):
    """Item -> SID codes and item -> cached multimodal embedding m_n, as non-persistent buffers.

    Row ``I`` (one past the last item) is the padding row: codes 0 and a zero embedding; it is only read
    at masked positions, whose outputs are discarded or masked.
    """

    def __init__(self, codes: torch.Tensor, item_emb: torch.Tensor):
        super().__init__()
        pad_codes = torch.zeros(1, codes.shape[1], dtype=torch.long)
        self.register_buffer("codes", torch.cat([codes.long(), pad_codes]), persistent=False)
        self.register_buffer("emb", torch.cat([item_emb.float(), torch.zeros(1, item_emb.shape[1])]), persistent=False)
        self.num_items = codes.shape[0]

    def _idx(self, items: torch.Tensor) -> torch.Tensor:
        return torch.where(items >= 0, items, torch.full_like(items, self.num_items))

    def item_codes(self, items: torch.Tensor) -> torch.Tensor:
        return self.codes[self._idx(items)]

    def item_emb(self, items: torch.Tensor) -> torch.Tensor:
        return self.emb[self._idx(items)]
