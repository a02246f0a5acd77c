"""``model.pref_memory``: Rec2PM recurrent preference memory for long user histories (issue 16;
/work/shared/papers/rec2pm-method.md; model code in comeir_dist/model/pref_memory.py).

Imports nothing but the config base, so ``config/run.py`` can import it."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from comeir_dist.config.base import Section


class PrefMemoryConfig(Section):
    """Preference memory knobs. Applies to ``model.variant`` tm, comeir (with ``model.decoding: normal``)
    and sasrec (one input vector per item); every other variant refuses ``enabled: true`` at build time with a one-line error."""

    enabled: bool = Field(False, description="Compress the archived history into C memory tokens per segment "
                          "(Rec2PM); the backbone reads [M_{k-1}; recent segment] instead of the last max_history "
                          "items (max_history is then unused).")
    tokens: int = Field(4, ge=1, description="C: memory tokens written per segment (= learnable query tokens Q_mem).")
    segment_items: int = Field(20, ge=1, description="Items per segment; segments are aligned from the user's first "
                               "interaction, the recent segment holds the last 1..segment_items items.")
    mode: Literal["overwrite", "append"] = Field("overwrite", description="overwrite (Rec2PM-O): M_k = m_k, C tokens; "
                                                  "append (Rec2PM-A): M_k = [M_{k-1}; m_k], C tokens per segment.")
    align_weight: float = Field(1.0, ge=0, description="lambda of L = L_AR + lambda L_con (0 = no consistency loss).")
    stop_grad_refs: bool = Field(True, description="Detach the reference memories m^ref where they are the L_con "
                                 "target: L_con trains the recurrent update, never the global reference pass.")
    stop_grad_ref_inputs: bool = Field(False, description="Also detach m^ref where it is the memory INPUT of the "
                                       "local pass: the global pass then gets no gradient at all (its query tokens "
                                       "only learn through the shared weights). Off = L_AR trains the memory writer.")
    archive_items: int = Field(1000, ge=1, description="Longest history kept per user (the archive the memory "
                               "compresses), trimmed to whole segments before the recent one.")

    @model_validator(mode="after")
    def _check(self):
        if self.archive_items < self.segment_items:
            raise ValueError(f"model.pref_memory.archive_items={self.archive_items} < segment_items="
                             f"{self.segment_items}")
        return self
