"""ComeIR generative recommender (Normal GR): item-level inputs from SID tokens + Engram memories,
an HF backbone producing h_u, and the memory-restoring head decoding the next SID (Algorithms 1-2)."""
from __future__ import annotations

import torch
from torch import nn

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.read import EngramRead
from comeir_dist.model.backbone import backbone_width, run_backbone
from comeir_dist.model.comeir_encoder import ComeIREncoder, history_units
from comeir_dist.model.engram_memory import EngramLookup, EngramTables
from comeir_dist.model.history import Catalog, HistoryBatch
from comeir_dist.model.memory_head import MemoryHead
from comeir_dist.model.token_embedding import SidTokenEmbedding


class ComeIRModel(nn.Module):
    variant = "comeir"

    def __init__(self, ecfg: EngramConfig, catalog: Catalog, codebooks: torch.Tensor, backbone: nn.Module,
                 trie, token_dim: int, window: int, ablations: set[str], sparse_device="cpu",
                 head_interaction: str = "none", memory_dropout: float = 0.0, head_memory_grad: bool = True):
        super().__init__()
        self.catalog, self.backbone, self.trie = catalog, backbone, trie
        self.levels, self.codebook_size = codebooks.shape[0], codebooks.shape[1]
        self.d_max = ecfg.d_max
        d = backbone_width(backbone)
        self.tokens = SidTokenEmbedding(codebooks, token_dim, d)
        self.lookup = EngramLookup(ecfg)
        reads = nn.ModuleDict()
        for l in range(1, self.levels + 1):
            for memory in ("intra", "inter"):
                n = len(self.lookup.orders(memory, l))
                if n:
                    reads[f"{memory}{l}"] = EngramRead(d, ecfg.d_m, n, d, addr_dropout=memory_dropout)
        self.reads = reads
        self.encoder = ComeIREncoder(self.levels, self.codebook_size, d, catalog.emb.shape[1], window, reads,
                                     ablations, ecfg.d_max)
        self.head = MemoryHead(self.levels, self.codebook_size, d, window, reads, ablations, ecfg.d_max,
                               interaction=head_interaction, memory_grad=head_memory_grad)
        self.tables = EngramTables(ecfg, device=sparse_device)  # the sparse part (sharded by parallel/)

    def _encode(self, batch: HistoryBatch, extra_requests=None):
        codes = self.catalog.item_codes(batch.items)
        mask = batch.mask
        units = history_units(codes, self.levels, self.codebook_size, self.d_max)
        lp = self.lookup.new_pass()
        handles = self.encoder.request(lp, codes, mask, units)
        extra = extra_requests(lp, units, mask) if extra_requests else None
        lp.run(self.tables)
        r, s0 = self.encoder(self.tokens(codes), self.catalog.item_emb(batch.items), codes, mask, units, lp, handles)
        h, _ = run_backbone(self.backbone, r, mask)
        return dict(h=h[:, -1], s0=s0, mask=mask, units=units, lp=lp, extra=extra)

    def level_logits(self, batch: HistoryBatch, target_codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher forcing (Eq. 12): logits ``[B, C]`` per level for the ground-truth prefixes."""

        def head_requests(lp, units, mask):
            reqs = []
            for l in range(self.levels):
                prefix = target_codes[:, :l]
                valid = self.trie.valid_mask(prefix, level=l).unsqueeze(1)
                reqs.append(self.head.request(lp, l + 1, prefix.unsqueeze(1), valid, units, mask))
            return reqs

        enc = self._encode(batch, head_requests)
        return [self.head.logits(enc["lp"], req, enc["h"], enc["s0"], enc["mask"],
                                 self.tokens.level_table(req.level - 1))[:, 0] for req in enc["extra"]]

    def decoder(self, batch: HistoryBatch):
        """``step_fn`` for beam search: h_u is computed once; each level reads the memories of its candidates."""
        enc = self._encode(batch)

        def step(level: int, prefixes: torch.Tensor, parent) -> torch.Tensor:
            lp = self.lookup.new_pass()
            valid = self.trie.valid_mask(prefixes, level=level)
            req = self.head.request(lp, level + 1, prefixes, valid, enc["units"], enc["mask"])
            lp.run(self.tables)
            return self.head.logits(lp, req, enc["h"], enc["s0"], enc["mask"], self.tokens.level_table(level))

        return step
