"""Engram memory configuration (paper App. B.2.2 defaults: L=3, C=128, d_m=256, K_S=2, K_T=4)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from comeir_dist.config.base import Section


class EngramConfig(Section):
    """Sizing, hashing and sparse-optimizer settings of the dual-level Engram memory.

    The table layout derived from these values is produced by :func:`comeir_dist.engram.sizing.table_specs`.
    """

    levels: int = Field(3, ge=1, le=8, description="SID length L (code levels). Intra tables exist for levels 2..L, inter tables for 1..L.")
    codebook_size: int = Field(128, ge=2, description="Codes per SID level C; codes are integers in [0, C).")
    s_s: float = Field(1.0, gt=0, description="Intra scale s_S: base B^S = C * s_S (Eq. 32); values above 1 are clipped by the exact domain C^o.")
    s_t: float = Field(2.0, gt=0, description="Inter scale s_T: level base B_l^T = (16 s_T)^l (Eq. 36). Paper default 2.0; 4.0 gives 4.431 B inter parameters.")
    d_m: int = Field(256, ge=2, description="Concatenated Engram address width d_m (Eq. 14); each head has d_m/K columns.")
    k_s: int = Field(2, ge=1, description="Hash heads K_S of the intra-item memory (each head has its own prime-sized table).")
    k_t: int = Field(4, ge=1, description="Hash heads K_T of the inter-item memory.")
    h_max: int = Field(20_000_000, ge=64, description="H_max: largest allowed bucket count of a single hash table.")
    d_max: int = Field(2_097_152, ge=2, description="D_max: cap of the integer domain of one encoded unit (SID prefix), Eq. 31/35.")
    max_order: int = Field(3, ge=1, description="Largest n-gram order: intra uses O_l^S = min(l, max_order); inter uses O_l^T = max(1, max_order + 1 - l).")
    inter_orders: Optional[list[int]] = Field(None, description="Explicit per-level inter order counts (O_1^T, ..., O_L^T); None = max(1, max_order + 1 - l), i.e. (3, 2, 1) for L=3.")
    hash_seed: int = Field(0, ge=0, description="Seed of the odd hash multipliers m_{a,k} (Eq. 39). Changing it scrambles a trained memory; it is saved with checkpoints.")
    short_keys: Literal["shorten", "drop"] = Field(
        "drop", description="Inter-item n-gram keys of an order o larger than the history so far (fewer than o "
        "real items up to the lookup position, Eq. 13/19). 'shorten' (the paper's clamped suffix): the key is "
        "the k < o real items, read from the order-o tables; the o-k missing elements are a marker outside the "
        "unit domain (D_l), so padding is never hashed, and the key differs from any full order-o key (and, "
        "living in the order-o tables, from the genuine order-k key). 'drop': that order contributes nothing "
        "(the rule of every run before this option). The encoder, the head's training keys and the decode-time "
        "candidate keys use the same rule. Saved with checkpoints; a checkpoint without it was 'drop', and "
        "resuming it with the other rule is refused.")
    min_key_users: int = Field(1, ge=1, description="Extension (not in the paper): a key addresses its row only when "
                               "at least this many distinct users' training sequences produce it; other keys read "
                               "the zero vector and train nothing (model/key_support.py). 1 = every key (the paper). "
                               "Rows of one user's keys replay that user's labels after an epoch.")
    cross_fit: bool = Field(False, description="Extension (not in the paper): two-fold cross-fitted memories. "
                            "Every history falls in one of two user folds (engram/cross_fit.py); its keys READ the rows "
                            "of the other fold and its gradients WRITE the rows of its own fold (straight-through), so "
                            "no sample reads a row its own user's samples trained -- as at test time, where the target "
                            "transition was never trained. Same tables: a key's two fold rows are two hash slots. "
                            "False = one row per key (the paper).")
    cross_fit_memories: list[Literal["intra", "inter"]] = Field(
        default_factory=lambda: ["intra", "inter"], description="With cross_fit: the memories whose keys are "
        "cross-fitted; the others keep one row per key, trained and read by every user. 'inter' alone (extension): an "
        "inter key holds a transition (history suffix -> next code), whose row would replay a training label, while an "
        "intra key is a prefix of one catalogue item (the encoder's keys are the history items themselves), which no "
        "label reaches, so its row may learn from all users. Default both (every run before this option).")
    cross_fit_unwritten: Literal["read", "empty"] = Field(
        "read", description="With cross_fit: what a key reads when no training sequence of the OTHER fold produces it, "
        "i.e. its read row is never trained (only its own fold's users make that key). 'read': the row as initialised "
        "(small uniform noise, which the read's LayerNorm scales up to a full-size random vector when no order is "
        "trained); 'empty': the zero vector, like a padded key, and a row no user of its fold produces is not "
        "trained either (model/key_support.py install_fold_filter). Computed from the training sequences at load.")
    table_dtype: Literal["fp32", "fp16"] = Field("fp32", description="Storage dtype of the sparse tables (lookups return fp32 either way).")
    sparse_lr: float = Field(0.05, gt=0, description="Learning rate of the fused exact row-wise Adagrad that updates the tables inside backward.")
    sparse_freeze_epochs: Optional[float] = Field(None, gt=0, description="Train the tables for this many epochs, "
                                                  "then freeze them (sparse rate 0) while the dense part goes on; "
                                                  "None = never. Counters the memories' one-epoch overfitting.")
    reinit_every_epoch: bool = Field(False, description="Re-initialise the tables and their row-wise Adagrad state at "
                                     "the start of every epoch after the first while the dense part keeps training "
                                     "(multi-epoch learning with embedding re-initialisation, MEDA, Fan et al. 2023): "
                                     "within an epoch no row has seen the sample that reads it, so the memories cannot "
                                     "replay a training label. The plateau schedule then cools the dense rate only.")
    eps: float = Field(1e-8, gt=0, description="Epsilon of the row-wise Adagrad denominator.")
    init_scale: float = Field(0.01, gt=0, description="Tables are initialised uniform(-init_scale, +init_scale).")

    @model_validator(mode="after")
    def _check(self) -> "EngramConfig":
        if self.d_m % self.k_s:
            raise ValueError(f"d_m={self.d_m} must be divisible by k_s={self.k_s}")
        if self.d_m % self.k_t:
            raise ValueError(f"d_m={self.d_m} must be divisible by k_t={self.k_t}")
        if self.inter_orders is not None:
            if len(self.inter_orders) != self.levels:
                raise ValueError(f"inter_orders needs one entry per level ({self.levels}), got {len(self.inter_orders)}")
            if any(o < 1 for o in self.inter_orders):
                raise ValueError("inter_orders entries must be >= 1")
        if self.d_max > 2**62:
            raise ValueError("d_max must be <= 2**62 (int64 hashing)")
        if self.h_max > 2**62:
            raise ValueError("h_max must be <= 2**62")
        if not self.cross_fit_memories or len(set(self.cross_fit_memories)) != len(self.cross_fit_memories):
            raise ValueError(f"cross_fit_memories={self.cross_fit_memories}: name intra and/or inter once each")
        if self.short_keys == "shorten" and self.d_max >= 2**62:
            raise ValueError("short_keys='shorten' needs d_max < 2**62 (its marker is the unit domain bound D_l)")
        return self

    # ---- derived layout -------------------------------------------------------------------
    def intra_orders(self, level: int) -> int:
        """O_l^S = min(l, max_order) for l >= 2 (no intra memory at level 1)."""
        return 0 if level < 2 else min(level, self.max_order)

    def inter_order_count(self, level: int) -> int:
        """O_l^T: explicit ``inter_orders`` or max(1, max_order + 1 - l) ((3, 2, 1) for L=3)."""
        if self.inter_orders is not None:
            return int(self.inter_orders[level - 1])
        return max(1, self.max_order + 1 - level)

    def unit_domain(self, level: int) -> int:
        """D_l = min(C^l, D_max): integer domain of an encoded level-l SID prefix (Eq. 31/35)."""
        return min(self.codebook_size**level, self.d_max)

    @property
    def intra_head_dim(self) -> int:
        return self.d_m // self.k_s

    @property
    def inter_head_dim(self) -> int:
        return self.d_m // self.k_t


# ---- configs saved before a field existed --------------------------------------------------------------
#: Value of ``short_keys`` for a saved config (checkpoint) that predates the option: keys were dropped.
LEGACY_SHORT_KEYS = "drop"


def upgrade_saved_config(config: dict) -> dict:
    """A RunConfig dict read from a checkpoint, with Engram fields that postdate it set to the behaviour the
    checkpoint was trained with (NOT the current class defaults, which may change): ``engram.short_keys``
    missing -> ``"drop"``. Modifies and returns ``config``; a non-dict is returned unchanged."""
    if isinstance(config, dict):
        eng = config.get("engram")
        if isinstance(eng, dict) and "short_keys" not in eng:
            eng["short_keys"] = LEGACY_SHORT_KEYS
    return config
