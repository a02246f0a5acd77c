"""The paper's two baselines as standard generative recommenders.

* flatten (TIGER-style): every history item contributes its L SID tokens, L*N inputs.
* tm (token merge, GenRec-style): the L code embeddings of an item are concatenated and linearly
  projected to one input vector per item.

Normal GR (``decoding="normal"``): the L target codes are generated autoregressively: position T-1
(last history input) predicts code 1, the embedding of the chosen code l is fed back to predict code l+1,
with one output layer per level over that level's codebook. Decoding reuses the KV cache; beams reorder it
by their parent index: L-1 cached backbone steps over B*K beams.

NEZHA (``decoding="nezha"``, App. B.2.3): the backbone runs once over [inputs; p_1..p_L] (Eq. 40) and the
level-l output layer scores xi_l = h_u^l + h_l (Eq. 41) instead of the autoregressive backbone state; the
generated code reaches the next level through the GRU recurrence (Eq. 42, nezha.py), one state per beam.

Token embeddings follow ``model.token_fusion`` (token_embedding.py; DECOR's fusion, Eq. 9-11, included). With
``model.decor.compose`` (Normal GR only, decor.py) the fed-back codes c^1..c^{L-1} enter the backbone as their
contextualized compositions (DECOR Eq. 12-18) instead of their static embeddings, and with ``bos_queries > 0`` a
composed BOS input (Eq. 19) sits after the history: code 1 is then predicted at the BOS position.
"""
from __future__ import annotations

import torch
from torch import nn

from comeir_dist.errors import UserError
from comeir_dist.model.backbone import backbone_width
from comeir_dist.model.code_decoder import cached_code_decoder, teacher_forced_code_logits
from comeir_dist.model.code_sequence import all_position_states, window_code_loss
from comeir_dist.model.decor import DecorComposer
from comeir_dist.model.decor_config import DecorConfig
from comeir_dist.model.decor_sequence import composed_sequence_loss
from comeir_dist.model.flatten_sequence import flatten_sequence_loss
from comeir_dist.model.history import Catalog, HistoryBatch
from comeir_dist.model.nezha import NezhaBeams, NezhaDecoding
from comeir_dist.model.sasrec import trim_left_padding
from comeir_dist.model.token_embedding import SidTokenEmbedding


class GenerativeBaseline(nn.Module):
    def __init__(self, variant: str, catalog: Catalog, codebooks: torch.Tensor, backbone: nn.Module, token_dim: int,
                 decoding: str = "normal", nezha_delta: str = "code", window: int = 4, fusion: str = "concat",
                 decor: DecorConfig | None = None):
        super().__init__()
        assert variant in ("flatten", "tm")
        self.variant = variant
        self.catalog = catalog
        self.backbone = backbone
        d = backbone_width(backbone)
        self.levels, self.codebook_size = codebooks.shape[0], codebooks.shape[1]
        decor = decor or DecorConfig()
        if decor.compose and decoding != "normal":
            raise UserError(f"model.decor.compose applies to model.decoding: normal ({variant} with {decoding} "
                            "feeds the generated codes to the GRU, not to the backbone); set model.decor.compose: false")
        self.tokens = SidTokenEmbedding(codebooks, token_dim, d, fusion, decor)
        self.merge = nn.Linear(self.levels * d, d) if variant == "tm" else None
        self.out = nn.ModuleList(nn.Linear(d, self.codebook_size) for _ in range(self.levels))
        self.decoding = decoding
        self.nezha = NezhaDecoding(self.levels, d, nezha_delta, window) if decoding == "nezha" else None
        # built last, so every other weight is initialised as without composition (same seed -> same weights)
        self.composer = DecorComposer(d, decor) if decor.compose else None

    # ---- inputs ---------------------------------------------------------------------------
    def history_inputs(self, batch: HistoryBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask, _, _ = self._inputs(batch, with_items=False)
        return x, mask

    def _inputs(self, batch: HistoryBatch, with_items: bool = True):
        """(backbone inputs, their mask, one vector per history item ``[B, N, d]`` or None, the token embeddings
        ``[B, N, L, d]``): the item vector is the merged input (tm) or the mean of the item's token embeddings
        (flatten), read by NEZHA's ``code_context`` Delta."""
        codes = self.catalog.item_codes(batch.items)  # [B, N, L]
        tok = self.tokens(codes)  # [B, N, L, d]
        mask = batch.mask
        if self.variant == "tm":
            merged = self.merge(tok.flatten(-2))
            return merged, mask, merged, tok
        b, n, l, d = tok.shape
        return (tok.reshape(b, n * l, d), mask.repeat_interleave(l, dim=1), tok.mean(dim=-2) if with_items else None,
                tok)

    # ---- DECOR composition (decor.py) --------------------------------------------------------------------------
    def _history_pool(self, tok: torch.Tensor, mask: torch.Tensor):
        """Pooling statistics (Eq. 14) over every history TOKEN (L per item, for tm too): the context of the BOS
        input and the start of every fed-back code's context."""
        return self.composer.history_state(tok.flatten(1, 2), mask.repeat_interleave(self.levels, dim=1))

    def _level_tables(self) -> list[torch.Tensor]:
        """Composition candidates of the fed-back levels 1..L-1: every code's static embedding (Eq. 17)."""
        return [self.tokens.level_table(l) for l in range(self.levels - 1)]

    def composition_weights(self, batch: HistoryBatch, target_codes: torch.Tensor):
        """Teacher-forced composition weights (Eq. 16): ``[B, C]`` per fed-back level 1..L-1, and the BOS query
        weights ``[B, N]`` (None without BOS queries)."""
        if self.composer is None:
            raise ValueError("composition_weights needs model.decor.compose")
        _, _, _, tok = self._inputs(batch, with_items=False)
        st = self._history_pool(tok, batch.mask)
        fed = self.tokens(target_codes[:, : self.levels - 1])
        _, ws = self.composer.compose(st, fed, self._level_tables(), with_weights=True)
        wb = self.composer.bos_input(st, fed.dtype, with_weights=True)[1] if self.composer.bos is not None else None
        return ws, wb

    # ---- training (teacher forcing, Eq. 3) ---------------------------------------------------
    def level_logits(self, batch: HistoryBatch, target_codes: torch.Tensor) -> list[torch.Tensor]:
        if self.nezha is not None:
            return self._nezha_level_logits(batch, target_codes)
        x, mask, _, tok = self._inputs(batch, with_items=False)
        first = x.shape[1] - 1  # the input whose output predicts code 1: the last history input ...
        fed = self.tokens(target_codes[:, : self.levels - 1])  # codes 1..L-1 fed back
        if self.composer is not None:
            st = self._history_pool(tok, batch.mask)
            fed = self.composer.compose(st, fed, self._level_tables())  # DECOR Eq. 12-18
            if self.composer.bos is not None:  # ... or the composed BOS after it (Eq. 19)
                fed = torch.cat([self.composer.bos_input(st, fed.dtype).unsqueeze(1), fed], dim=1)
                first += 1
        return teacher_forced_code_logits(self.backbone, x, mask, fed, self.out, first)

    def sequence_training_loss(self, batch: HistoryBatch, bf16: bool = False) -> torch.Tensor:
        """All-position training (``train.sample_mode: sequence``): flatten = one causal pass over a window's tokens
        (flatten_sequence.py); tm = one pass over its item inputs and every position's fed-back codes under a block
        mask (code_sequence.py); with DECOR composition the fed-back codes are composed per position
        (decor_sequence.py)."""
        if self.nezha is not None:
            raise UserError(f"train.sample_mode=sequence trains {self.variant} with model.decoding: normal (got "
                            f"{self.decoding}); use sample_mode: prefix")
        if self.composer is not None:
            return composed_sequence_loss(self, batch, bf16)
        if self.variant == "flatten":
            return flatten_sequence_loss(self, batch, bf16)
        width = batch.items.shape[1]
        items, target = trim_left_padding(batch.items, batch.target)
        codes = self.catalog.item_codes(target)  # [B, N, L]: every position's target
        with torch.autocast(items.device.type, dtype=torch.bfloat16, enabled=bf16):
            x, mask = self.history_inputs(HistoryBatch(items, target))
            states = all_position_states(self.backbone, x, mask, 1, self.tokens(codes[:, :, : self.levels - 1]))
        return window_code_loss(self, states, codes, target >= 0, width, bf16)

    # ---- decoding ----------------------------------------------------------------------------
    def decoder(self, batch: HistoryBatch):
        """A ``step_fn`` for :func:`comeir_dist.decode.beam.beam_search` that keeps a KV cache per beam
        (NEZHA: a recurrent state per beam, no backbone step after the first)."""
        if self.nezha is not None:
            return self._nezha_decoder(batch)
        x, mask, _, tok = self._inputs(batch, with_items=False)
        composer = self.composer
        if composer is not None:
            st = self._history_pool(tok, batch.mask)
            tables = self._level_tables()
            if composer.bos is not None:  # the composed BOS input (Eq. 19) is part of the prefill
                x = torch.cat([x, composer.bos_input(st, x.dtype).unsqueeze(1)], dim=1)
                mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)], dim=1)

        def feed(level: int, prefixes: torch.Tensor, b: int, k: int) -> torch.Tensor:
            if composer is None:
                return self.tokens(prefixes[:, :, -1].reshape(-1, 1), level - 1)  # [B*K, 1, d]
            # the newest code composed with its beam's context: history + the beam's codes (Eq. 12-18)
            users = torch.arange(b, device=prefixes.device).repeat_interleave(k)
            gen = self.tokens(prefixes.reshape(b * k, level))
            return composer.compose(st.rows(users), gen, tables, positions=[level - 1])

        return cached_code_decoder(self.backbone, x, mask, self.out, feed)

    # ---- NEZHA (Eq. 40-42) ---------------------------------------------------------------------
    def _nezha_level_logits(self, batch: HistoryBatch, target_codes: torch.Tensor) -> list[torch.Tensor]:
        x, mask, items, _ = self._inputs(batch)
        h_u, h_p = self.nezha.encode(self.backbone, x, mask)
        fed = self.tokens(target_codes[:, : self.levels - 1])  # teacher forcing drives the GRU (Alg. 1 line 22)
        xis = self.nezha.teacher_forced(h_u, h_p, fed, items, batch.mask)
        return [self.out[l](xi) for l, xi in enumerate(xis)]

    def _nezha_decoder(self, batch: HistoryBatch):
        x, mask, items, _ = self._inputs(batch)
        h_u, h_p = self.nezha.encode(self.backbone, x, mask)
        beams = NezhaBeams(self.nezha, h_u, h_p, items, batch.mask, self.tokens)

        def step(level: int, prefixes: torch.Tensor, parent: torch.Tensor | None) -> torch.Tensor:
            return self.out[level](beams.states(level, prefixes, parent))

        return step
