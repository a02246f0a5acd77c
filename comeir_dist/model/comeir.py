"""ComeIR generative recommender: item-level inputs from SID tokens + Engram memories, an HF backbone
producing h_u, and the memory-restoring head decoding the next SID (Algorithms 1-2).

``decoding="normal"`` (Normal GR, App. B.2.3): zeta_l = h_u for every level (Alg. 1 lines 8-9, Alg. 2 line 4).
``decoding="nezha"``: placeholders + per-level recurrent state (Eq. 40-42, nezha.py); the head reads with
zeta_l = xi_l (Alg. 1 line 17, Alg. 2 line 14), which during beam search differs per beam (:func:`per_beam_logits`).

``model.token_fusion`` (token_embedding.py) sets the SID token embedding e_c everywhere ComeIR uses Eq. 2: the
encoder's token inputs (Eq. 4), NEZHA's generated-code embeddings (Eq. 42) AND the head's candidate embedding e_x
(Eq. 10, ``tokens.level_table``). With ``decor`` the fused embedding of DECOR Eq. 11 therefore also replaces e_x:
ComeIR defines e_x as the Eq. 2 embedding of code x, and DECOR's fusion is a drop-in replacement of Eq. 2, so the
candidate side keeps the pretrained channel too (a head scoring with another table would have to learn a second
embedding per code from the loss alone). DECOR's composition is not used by ComeIR (``model.decor.compose`` is
refused): Normal-GR ComeIR feeds no generated code back to the backbone, and a candidate embedding composed from
the context would blur the candidates the head has to tell apart.

``head="decoder"`` (``model.comeir_head``, an extension): the inputs R^I as above, but the next SID is decoded like
tm / flatten's Normal GR (code_decoder.py: generated codes fed back through the backbone, one output layer per level)
instead of by the memory-restoring head; it separates what ComeIR's inputs and its head each contribute.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from comeir_dist.engram.config import EngramConfig
from comeir_dist.engram.cross_fit import history_fold
from comeir_dist.engram.read import EngramRead
from comeir_dist.errors import UserError
from comeir_dist.model.backbone import backbone_width, run_backbone
from comeir_dist.model.code_decoder import cached_code_decoder, teacher_forced_code_logits
from comeir_dist.model.comeir_encoder import ComeIREncoder, EncoderMemoryOptions, history_units
from comeir_dist.model.comeir_sequence import comeir_sequence_loss
from comeir_dist.model.decor_config import DecorConfig
from comeir_dist.model.engram_memory import EngramLookup, EngramTables
from comeir_dist.model.history import Catalog, HistoryBatch
from comeir_dist.model.memory_head import HeadRequest, MemoryHead
from comeir_dist.model.nezha import NezhaBeams, NezhaDecoding
from comeir_dist.model.token_embedding import SidTokenEmbedding


class ComeIRModel(nn.Module):
    variant = "comeir"

    def __init__(self, ecfg: EngramConfig, catalog: Catalog, codebooks: torch.Tensor, backbone: nn.Module,
                 trie, token_dim: int, window: int, ablations: set[str], sparse_device="cpu",
                 head_interaction: str = "none", memory_dropout: float = 0.0, head_memory_grad: bool = True,
                 decoding: str = "normal", nezha_delta: str = "code", fusion: str = "concat",
                 decor: DecorConfig | None = None, head: str = "memory",
                 encoder_options: EncoderMemoryOptions = EncoderMemoryOptions()):
        super().__init__()
        if decor is not None and decor.compose:
            raise UserError("model.decor.compose applies to flatten / tm with model.decoding: normal (the variants "
                            "that feed generated codes back to the backbone); comeir takes model.token_fusion only")
        self.catalog, self.backbone, self.trie = catalog, backbone, trie
        self.levels, self.codebook_size = codebooks.shape[0], codebooks.shape[1]
        self.d_max = ecfg.d_max
        d = backbone_width(backbone)
        self.tokens = SidTokenEmbedding(codebooks, token_dim, d, fusion, decor)
        self.lookup = EngramLookup(ecfg)
        reads = nn.ModuleDict()
        for l in range(1, self.levels + 1):
            for memory in ("intra", "inter"):
                n = len(self.lookup.orders(memory, l))
                if n:
                    reads[f"{memory}{l}"] = EngramRead(d, ecfg.d_m, n, d, addr_dropout=memory_dropout)
        self.reads = reads
        self.encoder = ComeIREncoder(self.levels, self.codebook_size, d, catalog.emb.shape[1], window, reads,
                                     ablations, ecfg.d_max, encoder_options)
        if head == "decoder":  # extension (ModelConfig refuses it with nezha): the Normal-GR decoder of tm / flatten
            self.head = None
            self.out = nn.ModuleList(nn.Linear(d, self.codebook_size) for _ in range(self.levels))
        else:
            self.head = MemoryHead(self.levels, self.codebook_size, d, window, reads, ablations, ecfg.d_max,
                                   interaction=head_interaction, memory_grad=head_memory_grad)
        self.tables = EngramTables(ecfg, device=sparse_device)  # the sparse part (sharded by parallel/)
        self.decoding = decoding
        self.nezha = NezhaDecoding(self.levels, d, nezha_delta, window) if decoding == "nezha" else None

    def encoder_pass(self, items: torch.Tensor, extra_requests=None) -> dict:
        """One Engram lookup pass (the encoder's keys + ``extra_requests(lp, units, mask)``) and the encoder:
        ``r`` (R^I, the backbone inputs), ``s0``, ``mask``, ``units``, the run ``lp`` and the extra requests."""
        codes = self.catalog.item_codes(items)
        mask = items >= 0
        units = history_units(codes, self.levels, self.codebook_size, self.d_max)
        lp = self.lookup.new_pass(history_fold(items) if self.lookup.cross_fit else None)
        handles = self.encoder.request(lp, codes, mask, units)
        extra = extra_requests(lp, units, mask) if extra_requests else None
        lp.run(self.tables)
        r, s0 = self.encoder(self.tokens(codes), self.catalog.item_emb(items), codes, mask, units, lp, handles)
        return dict(r=r, s0=s0, mask=mask, units=units, lp=lp, extra=extra)

    def _encode(self, batch: HistoryBatch, extra_requests=None):
        enc = self.encoder_pass(batch.items, extra_requests)
        r, mask = enc.pop("r"), enc["mask"]
        if self.nezha is None:
            h, _ = run_backbone(self.backbone, r, mask)
            return dict(enc, h=h[:, -1])
        h_u, h_p = self.nezha.encode(self.backbone, r, mask)  # Eq. 40: one pass over [R^I; p_1..p_L]
        return dict(enc, h=h_u, h_p=h_p)

    def head_requests(self, target_codes: torch.Tensor):
        """``extra_requests`` of teacher forcing: the head's keys of every level for the ground-truth prefixes."""

        def requests(lp, units, mask):
            reqs = []
            for l in range(self.levels):
                prefix = target_codes[:, :l]
                valid = self.trie.valid_mask(prefix, level=l).unsqueeze(1)
                reqs.append(self.head.request(lp, l + 1, prefix.unsqueeze(1), valid, units, mask, lp.fold))
            return reqs

        return requests

    def level_logits(self, batch: HistoryBatch, target_codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher forcing (Eq. 12): logits ``[B, C]`` per level for the ground-truth prefixes."""
        if self.head is None:  # head: decoder -- codes 1..L-1 fed back after R^I
            enc = self.encoder_pass(batch.items)
            r = enc["r"]
            fed = self.tokens(target_codes[:, : self.levels - 1])
            return teacher_forced_code_logits(self.backbone, r, enc["mask"], fed, self.out, r.shape[1] - 1)
        enc = self._encode(batch, self.head_requests(target_codes))
        if self.nezha is None:
            zetas = [enc["h"]] * self.levels
        else:  # zeta_l = xi_l, recurrence driven by the ground-truth codes (teacher forcing, Alg. 1 line 22)
            zetas = self.nezha.teacher_forced(enc["h"], enc["h_p"], self.tokens(target_codes[:, : self.levels - 1]),
                                              enc["s0"], enc["mask"])
        return [self.head.logits(enc["lp"], req, zeta, enc["s0"], enc["mask"],
                                 self.tokens.level_table(req.level - 1))[:, 0] for req, zeta in zip(enc["extra"], zetas)]

    def sequence_training_loss(self, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
        """All-position training (``train.sample_mode: sequence``): one encoder and backbone pass per window, the
        head once per target (comeir_sequence.py)."""
        if self.nezha is not None:
            raise UserError("train.sample_mode=sequence trains comeir with model.decoding: normal (got nezha); use "
                            "sample_mode: prefix")
        return comeir_sequence_loss(self, batch, bf16)

    def decoder(self, batch: HistoryBatch):
        """``step_fn`` for beam search: the backbone runs once; each level reads the memories of its candidates
        (NEZHA: with each beam's own state xi_l, reordered with the beams' parents)."""
        if self.head is None:
            enc = self.encoder_pass(batch.items)
            return cached_code_decoder(self.backbone, enc["r"], enc["mask"], self.out,
                                       lambda level, prefixes, b, k: self.tokens(prefixes[:, :, -1].reshape(-1, 1),
                                                                                 level - 1))
        enc = self._encode(batch)
        beams = None if self.nezha is None else NezhaBeams(self.nezha, enc["h"], enc["h_p"], enc["s0"], enc["mask"],
                                                           self.tokens)

        def step(level: int, prefixes: torch.Tensor, parent) -> torch.Tensor:
            lp = self.lookup.new_pass(enc["lp"].fold)
            valid = self.trie.valid_mask(prefixes, level=level)
            req = self.head.request(lp, level + 1, prefixes, valid, enc["units"], enc["mask"], lp.fold)
            lp.run(self.tables)
            table = self.tokens.level_table(level)
            if beams is None:
                return self.head.logits(lp, req, enc["h"], enc["s0"], enc["mask"], table)
            xi = beams.states(level, prefixes, parent)  # [B, K, d]
            return per_beam_logits(self.head, lp, req, xi, enc["s0"], enc["mask"], table)

        return step


def per_beam_logits(head: MemoryHead, lp, req: HeadRequest, zeta: torch.Tensor, s0: torch.Tensor,
                    mask: torch.Tensor, code_emb: torch.Tensor) -> torch.Tensor:
    """``head.logits`` with one state per beam, ``zeta [B, K, d]`` -> ``[B, K, C]``.

    The head takes one zeta per row of its batch and gathers it per (beam, candidate) pair with ``req.b``
    (W_H zeta, the intra read R^S(zeta, .), the decode query q^D(zeta) of Eq. 23, 25). Folding (user, beam)
    into that row dimension -- pair (b, k, x) becomes row b*K + k of a K=1 request -- gives every beam its
    own zeta without touching the head; the Engram keys and their lookups are those of ``req`` (built per
    user, M pairs) and are reused as they are. s^0 / mask enter only through the decode query over the last
    ``window`` items (Eq. 25), so only that window is repeated per beam."""
    b, k, c = req.shape
    if k == 1:
        return head.logits(lp, req, zeta[:, 0], s0, mask, code_emb)
    flat = dataclasses.replace(req, b=req.b * k + req.k, k=torch.zeros_like(req.k), shape=(b * k, 1, c),
                               prefixes=req.prefixes.reshape(b * k, 1, req.prefixes.shape[-1]))
    w = head.window
    s0_w = s0[:, -w:].repeat_interleave(k, dim=0)
    mask_w = mask[:, -w:].repeat_interleave(k, dim=0)
    return head.logits(lp, flat, zeta.reshape(b * k, -1), s0_w, mask_w, code_emb).reshape(b, k, c)
