"""``model.decor``: settings of DECOR's decomposed embedding fusion and contextualized token composition
(paper: *Learning Decomposed Contextual Token Representations from Pretrained and Collaborative Signals for
Generative Recommendation*, /work/shared/papers/decor.md; code in comeir_dist/model/decor.py).

Which fusion is used is ``model.token_fusion`` (learned | pretrained | concat | decor); this section only holds
the knobs of the DECOR pieces. Imports nothing but the config base, so ``config/run.py`` can import it."""
from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from comeir_dist.config.base import Section

TOKEN_FUSIONS = ("learned", "pretrained", "concat", "decor")


class DecorConfig(Section):
    """DECOR knobs. Composition (``compose``) applies to flatten / tm with ``model.decoding: normal``, the
    variants that feed the generated codes back through the backbone; anything else refuses it at build time."""

    compose: bool = Field(False, description="Contextualized token composition (Eq. 12-18) of the generated "
                          "codes fed back to the backbone: e_final = alpha * sum_c' a_c' e_c' + (1 - alpha) * e_c.")
    alpha: float = Field(0.25, ge=0, le=1, description="Residual mix of Eq. 18 (paper Table 5: 0.25 Scientific, "
                         "0.55 Instrument/Game). 0 = static embeddings (composition computed, weight 0).")
    bos_queries: int = Field(0, ge=0, description="N learnable BOS queries (Eq. 19); > 0 adds a composed BOS input "
                             "after the history from which the first code is predicted (needs compose). "
                             "Paper: 32 (Scientific), 64.")
    ctx_hidden: Optional[int] = Field(None, ge=1, description="Hidden width of the attention pooling scorer "
                                      "(W, b of Eq. 14) and of MLP_ctx (Eq. 13: Linear-GELU-Linear back to the "
                                      "backbone width). None = the backbone width.")
    context_current: bool = Field(True, description="The context u_c of a fed-back code c^l pools the history "
                                  "tokens and the generated codes c^1..c^l INCLUDING c^l itself (True) or only "
                                  "c^1..c^{l-1} (False). Either way causal: level-l logits never see codes >= l.")
    fuse_dim: Optional[int] = Field(None, ge=1, description="d' of Eq. 10 (width after W_pre / W_collab); "
                                    "None = the backbone width.")
    collab_dim: Optional[int] = Field(None, ge=1, description="Width of the learned collaborative embedding "
                                      "e_collab. None = the codebook width (Eq. 9: E_pre and E_collab share d).")
    fusion_ln: bool = Field(True, description="The LayerNorms of Eq. 10 (off only to check the reduction to "
                            "Eq. 2's concat embedding).")

    @model_validator(mode="after")
    def _check(self):
        if self.bos_queries and not self.compose:
            raise ValueError(f"bos_queries={self.bos_queries} needs compose: true (the BOS embedding is composed "
                             "from the queries with the context vector, Eq. 19)")
        return self
