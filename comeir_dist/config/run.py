"""Config of a training / evaluation run (configs/*.yaml used by `comeir train`, `comeir experiment`)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from comeir_dist.config.base import Section, Seed
from comeir_dist.config.parallel import ParallelConfig
from comeir_dist.config.ray_job import RayTrainConfig
from comeir_dist.engram.config import EngramConfig
from comeir_dist.model.decor_config import TOKEN_FUSIONS, DecorConfig
from comeir_dist.model.pref_memory_config import PrefMemoryConfig

VARIANTS = ("comeir", "flatten", "tm", "sasrec")
ABLATIONS = ("no_mm_scoring", "no_memory_merge", "no_e_intra", "no_e_inter", "no_d_intra", "no_d_inter")


class BackboneConfig(Section):
    """Hugging Face decoder fed with ``inputs_embeds``: a local checkpoint (``path``), an architecture
    (``config_file``, random init) or built from the sizes."""

    arch: Literal["qwen3", "llama"] = "qwen3"
    path: Optional[str] = Field(None, description="Local HF checkpoint dir (e.g. Qwen3-0.6B). None = build from "
                                "config_file, else from the sizes below (random init).")
    config_file: Optional[str] = Field(
        None, min_length=1, description="Hugging Face config.json of the backbone (architecture only, no weights), e.g. "
        "configs/backbones/qwen3-0.6b.json. `comeir plan` (and the fit check) counts the dense parameters from it "
        "when `path` is unset or not on this machine; training without `path` builds this architecture with random "
        "init (with `path` set, training needs the checkpoint). The sizes and dropout below are then ignored, as "
        "with `path`. A relative path is looked up in the working directory, then the repo root, then "
        "configs/backbones/<name>.")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=8)
    head_dim: Optional[int] = Field(None, description="Attention head dim (Qwen3); None = hidden_size / num_heads.")
    max_positions: int = Field(256, ge=8, description="Backbone positions; flatten needs L*max_history + L.")
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self):
        if self.path is None and self.config_file is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        return self


class ModelConfig(Section):
    """Input constructor, head and ablation switches (paper Sections 3, 4.3)."""

    variant: Literal["comeir", "flatten", "tm", "sasrec"] = Field("comeir", description="comeir | flatten (TIGER-style L*N tokens) | tm (token merge: concat + linear) | sasrec (item-ID baseline: one learned embedding per item, causal backbone, cross-entropy over all items; no SIDs, no Engram tables).")
    token_dim: int = Field(64, ge=4, description="Width of the learnable token embedding e^T (Eq. 2).")
    window: int = Field(4, ge=1, description="w: window of the transition query (Eq. 21) and decode query (Eq. 25).")
    ablations: list[str] = Field(default_factory=list, description=f"Any of {', '.join(ABLATIONS)}.")
    head_interaction: Literal["none", "dot"] = Field(
        "none", description="ComeIR head scoring. 'none' = the paper's Eq. 10 exactly, psi_l(x) = w_l^T LN(W_H h_u + "
        "W_C e_x + mu_l(x)). 'dot' (extension, not in the paper) adds a direct user-candidate term "
        "LN(W_Q h_u + sum_j P_j c^j)^T (W_O e_x) + b_x in which the generated prefix c^{<l} conditions the query.")
    comeir_head: Literal["memory", "decoder"] = Field(
        "memory", description="ComeIR's output side. 'memory' = the paper's memory-restoring head (Eq. 10, 23-27) "
        "over h_u. 'decoder' (extension, a diagnostic of which half carries ComeIR's result): ComeIR's inputs R^I "
        "(MM scoring, Engram reads, memory-conditioned merge) with the Normal-GR decoder of tm / flatten -- the "
        "generated codes are fed back through the backbone and one output layer per level scores every code; the "
        "head's memory reads (no_d_intra / no_d_inter), head_interaction and head_memory_grad do not apply.")
    head_memory_grad: bool = Field(True, description="False (extension): the memory-restoring head reads the "
                                   "Engram tables without writing them; only the encoder's reads train the rows.")
    encoder_memory_grad: bool = Field(True, description="False (extension): the encoder reads the Engram tables "
                                      "without writing them; only the memory-restoring head's reads train the rows, "
                                      "which the encoder then uses as input evidence (the mirror of head_memory_grad).")
    merge_value_init: Literal["default", "zero"] = Field(
        "default", description="Initial W^M_{V,l} of the memory-conditioned merge (Eq. 7). 'default' = PyTorch's Linear "
        "init (the paper gives none); 'zero' (extension, ReZero-style) = the merge adds nothing at the start, so "
        "r = LN(s^0) until W_V learns; the memory rows get gradient only as W_V grows.")
    merge_input_norm: bool = Field(False, description="True (extension): the merge (Eq. 7) starts from LN(s^0) "
                                   "instead of s^0. The scored token mix has a norm near 1 while the memory reads leave "
                                   "a LayerNorm at full size; trained with the paper's merge, the memory term is 30-90x "
                                   "larger than s^0 (`comeir analyze merge`), so the item vector is almost all memory.")
    merge_gate_bias: float = Field(0.0, description="Initial b_l of the memory-conditioned merge gate omega (Eq. 7). "
                                   "0 = omega starts near 0.5; a negative value (extension) starts the encoder's memory "
                                   "reads nearly closed (-4: omega ~0.02), so the item vector is s^0 unless training "
                                   "opens the gate (on the bundled data it keeps it shut: README, round 22).")
    memory_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on Engram addresses read by ComeIR "
                                  "(encoder and head) during training; regularises the hashed memories.")
    decoding: Literal["normal", "nezha"] = Field(
        "normal", description="Generation architecture (App. B.2.3). 'normal' = Normal GR (one user state h_u; "
        "flatten / tm feed generated codes back through the backbone). 'nezha' = L trainable placeholders after the "
        "history (Eq. 40), per-level state xi_l = h_u^l + h_l (Eq. 41), GRU update per level (Eq. 42): ONE "
        "backbone pass per batch, no backbone step per level. Needs backbone.max_positions >= inputs + L.")
    nezha_delta: Literal["code", "code_context"] = Field(
        "code", description="NEZHA transition input Delta_l of Eq. 42: 'code' = the SID-token embedding of the "
        "generated code c^l (Eq. 2); 'code_context' = that plus a projection of an inter-item context (attention "
        "over the last `window` history item vectors, query = recurrent state + code embedding).")
    token_fusion: Literal[TOKEN_FUSIONS] = Field(
        "concat", description="SID token embedding. 'concat' = Eq. 2, W_E[e^B; e^T] (frozen codebook vector + learned "
        "token; the default). 'learned' = a learned code embedding only (DECOR's TIGER base). 'pretrained' = W e^B, the "
        "frozen codebook vector only. 'decor' = DECOR Eq. 9-11, W_fuse[LN(W_pre e_pre) || LN(W_collab e_collab)]. "
        "Also the candidate embedding e_x of the ComeIR head (Eq. 10).")
    decor: DecorConfig = Field(default_factory=DecorConfig, description="DECOR fusion / composition knobs.")
    pref_memory: PrefMemoryConfig = Field(default_factory=PrefMemoryConfig, description="Rec2PM preference memory (tm, sasrec, comeir).")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)

    @model_validator(mode="after")
    def _check(self):
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"unknown ablation {bad[0]!r}; allowed values: {', '.join(ABLATIONS)}")
        if self.comeir_head == "decoder":
            clash = {"variant": self.variant != "comeir", "decoding": self.decoding != "normal",
                     "head_interaction": self.head_interaction != "none", "head_memory_grad": not self.head_memory_grad,
                     "ablations": any(a.startswith("no_d_") for a in self.ablations),
                     "pref_memory": self.pref_memory.enabled}
            bad = [k for k, v in clash.items() if v]
            if bad:
                raise ValueError(f"comeir_head=decoder applies to model.variant comeir with decoding normal, "
                                 f"head_interaction none, head_memory_grad true, no no_d_* ablation and no "
                                 f"pref_memory; conflicting: {', '.join(bad)}")
        if not self.encoder_memory_grad and (self.comeir_head != "memory" or not self.head_memory_grad):
            raise ValueError("model.encoder_memory_grad=false leaves the memory-restoring head as the only writer of "
                             "the Engram tables: it needs model.comeir_head memory and model.head_memory_grad true")
        return self


class TrainConfig(Section):
    """Optimisation (AdamW for dense, fused row-wise Adagrad for the Engram tables)."""

    batch_size: int = Field(256, ge=1, description="GLOBAL samples per optimizer step (all ranks, all micro-batches).")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step (DeepSpeed "
                                  "gradient_accumulation_steps): batch_size is split into this many micro-batches; "
                                  "dense gradients accumulate, the fused Engram tables update after every "
                                  "micro-batch (their optimizer runs inside backward).")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(3000, ge=1)
    lr_schedule: Literal["cosine", "constant", "plateau"] = Field(
        "cosine", description="After the linear warm-up: 'cosine' = decay to 0.1x at max_steps (ties the rate to "
        "max_steps); 'constant'; 'plateau' = constant, multiplied by plateau_factor (dense AdamW AND sparse "
        "Adagrad rates) after every validation that does not improve, so no budget has to be guessed.")
    plateau_factor: float = Field(0.5, gt=0, le=1, description="LR multiplier per non-improving validation ('plateau').")
    max_epochs: Optional[float] = Field(None, gt=0, description="Budget in epochs of the training samples; "
                                        "overrides max_steps when set (same rule for every variant).")
    eval_every_epochs: Optional[float] = Field(None, gt=0, description="Validate every this many epochs; "
                                               "overrides eval_every when set (patience then counts these).")
    max_minutes: Optional[float] = Field(None, gt=0, description="Wall-clock training budget; stops at whichever of max_steps/max_minutes comes first.")
    grad_clip: float = Field(1.0, gt=0)
    length_buckets: int = Field(0, ge=0, description="0 = batches drawn in random order. k > 0: every run of k "
                                "batches of the shuffled order is sorted by sample length before it is cut into "
                                "batches (then the batches are shuffled), so a batch pads to its own longest history: "
                                "for long, varied histories (sample_mode sequence, pref_memory archives).")
    sample_mode: Literal["prefix", "sequence", "auto"] = Field(
        "prefix", description="Training samples. 'prefix' = every prefix of every training sequence with its next "
        "item (every variant). 'sequence' (sasrec with or without pref_memory; flatten, tm and comeir with decoding "
        "normal and no pref_memory) = windows of each training sequence (max_history items, or "
        "pref_memory.archive_items aligned to segments) with the next item at EVERY position as target (SASRec's own "
        "all-position training; Rec2PM's L_AR over every segment; for flatten one causal pass over the window's SID "
        "tokens scores every item's codes; for tm one pass over the item inputs and every position's fed-back codes "
        "under a block mask; for comeir one encoder + backbone pass per window, the memory head once per target): "
        "one sample per window instead of one per item, so long histories cost one pass per window, not one per "
        "prefix. 'auto' = 'sequence' for the variants that can train on every position (then with "
        "sequence_batch_size / sequence_warmup_steps), else 'prefix': one config for a whole comparison "
        "(`comeir recipe` writes it).")
    sequence_batch_size: Optional[int] = Field(None, ge=1, description="With sample_mode 'auto': the global batch "
                                               "in windows of the variants that train on every position (None = "
                                               "batch_size). A window holds up to max_history targets.")
    sequence_warmup_steps: Optional[int] = Field(None, ge=0, description="With sample_mode 'auto': warmup_steps of "
                                                 "the variants that train on every position (None = warmup_steps).")
    bf16: bool = Field(False, description="bf16 autocast for the dense part.")
    eval_every: int = Field(500, ge=1, description="Validation NDCG@10 every N steps.")
    eval_users: Optional[int] = Field(2000, ge=1, description="Validation users per check (None = all).")
    patience: int = Field(4, ge=1, description="Early stopping after this many validations without improvement.")
    min_delta: float = Field(0.0, ge=0, description="A validation counts as an improvement (resets patience; the "
                             "'plateau' schedule keeps its rate) only when its NDCG@10 beats the value of the last "
                             "improvement by more than this. The best checkpoint is still the highest value seen.")
    min_lr_scale: Optional[float] = Field(None, gt=0, lt=1, description="With lr_schedule 'plateau': stop once the "
                                          "learning-rate scale has fallen below this (None = never).")
    log_every: int = Field(50, ge=1)
    num_threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads (None = torch default).")
    save_best: bool = Field(True, description="Write best/ (dense + FULL tables assembled on rank 0) at each new best "
                            "validation. Off for huge tables (scaling sweeps) where the full copy would not fit.")
    final_test: bool = Field(False, description="After training, evaluate the test split with the in-memory final "
                             "model (sharded like validation) into summary.json['test'].")
    check_memory: bool = Field(True, description="Refuse to start when the memory plan (comeir plan) says a rank "
                               "cannot hold its tables + dense share.")

    @model_validator(mode="after")
    def _check_accumulation(self):
        for name in ("batch_size", "sequence_batch_size"):
            size = getattr(self, name)
            if size is not None and size < self.grad_accum_steps:
                raise ValueError(f"train.{name}={size} is smaller than train.grad_accum_steps="
                                 f"{self.grad_accum_steps} (each micro-batch needs a sample)")
        if self.min_lr_scale is not None and self.lr_schedule != "plateau":
            raise ValueError(f"train.min_lr_scale={self.min_lr_scale} needs train.lr_schedule: plateau "
                             f"(got {self.lr_schedule}; only that schedule lowers the rate)")
        return self


class EvalConfig(Section):
    """Constrained beam search evaluation."""

    beam_size: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    ks: list[int] = Field(default_factory=lambda: [5, 10], description="Cut-offs K of Hit@K / NDCG@K: positive, "
                          "increasing, and including 10 (validation and early stopping use item/ndcg@10).")

    @field_validator("ks")
    @classmethod
    def _check_ks(cls, ks: list[int]) -> list[int]:
        allowed = "allowed: increasing positive integers that include 10 (validation uses item/ndcg@10), e.g. [5, 10]"
        if any(k < 1 for k in ks):
            raise ValueError(f"K={min(ks)} is not positive; {allowed}")
        if any(b <= a for a, b in zip(ks, ks[1:])):
            raise ValueError(f"not strictly increasing; {allowed}")
        if 10 not in ks:
            raise ValueError(f"10 is missing; {allowed}")
        return ks


class RunConfig(Section):
    """A full training run: which data and SIDs, the Engram sizing, the model and the optimisation."""

    dataset: str = Field("runs/data/scientific", description="Prepared dataset dir (comeir prepare).")
    sid_method: Literal["rqkmeans", "rqvae"] = "rqkmeans"
    max_history: int = Field(20, ge=1)
    seed: Seed = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str = Field("runs/train/comeir", description="Run dir: checkpoints, metrics, logs.")
    engram: EngramConfig = Field(default_factory=EngramConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    ray: RayTrainConfig = Field(default_factory=RayTrainConfig)

    @model_validator(mode="after")
    def _check(self):
        need = self.max_history * self.engram.levels + self.engram.levels + 1
        if self.model.variant == "flatten" and self.model.backbone.max_positions < need:
            raise ValueError(f"model.backbone.max_positions={self.model.backbone.max_positions} < {need} "
                             f"needed by flatten (L*max_history + L + 1)")
        if self.train.sample_mode == "sequence" and not trains_every_position(self.model):
            m = self.model
            raise ValueError(f"train.sample_mode=sequence with {m.variant} needs model.decoding: normal and no "
                             f"model.pref_memory (got decoding {m.decoding}, pref_memory {m.pref_memory.enabled}; "
                             f"train.sample_mode: auto picks prefix for them)")
        if self.engram.cross_fit_unwritten != "read" and not self.engram.cross_fit:
            raise ValueError(f"engram.cross_fit_unwritten={self.engram.cross_fit_unwritten} needs engram.cross_fit: true")
        if self.engram.cross_fit_unwritten != "read" and set(self.engram.cross_fit_memories) != {"intra", "inter"}:
            raise ValueError("engram.cross_fit_unwritten=empty filters the fold rows of both memories; it needs "
                             "engram.cross_fit_memories: [intra, inter]")
        if self.engram.cross_fit and self.model.pref_memory.enabled:
            raise ValueError("engram.cross_fit: the fold is a hash of the oldest item of the model's input, which "
                             "model.pref_memory splits into segments; use one of the two")
        if self.model.backbone.max_positions < self.max_history + 1:
            raise ValueError(f"max_history={self.max_history} is longer than the model's positions "
                             f"({self.model.backbone.max_positions})")
        return self


def trains_every_position(model: ModelConfig) -> bool:
    """Whether ``model`` can train on every position of a window (``train.sample_mode: sequence``): sasrec, and
    flatten / tm (with or without DECOR composition) / comeir with normal decoding and no preference memory (NEZHA's
    placeholders and recurrent state belong to one prefix sample; one window pass does not reproduce them yet)."""
    if model.variant == "sasrec":
        return True
    return model.variant in ("flatten", "tm", "comeir") and model.decoding == "normal" and not model.pref_memory.enabled


def resolve_sample_mode(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``train.sample_mode: auto`` made concrete for its variant: 'sequence' with the
    ``sequence_*`` batch and warm-up where :func:`trains_every_position`, else 'prefix'. Training starts from the
    resolved config, so checkpoints record what ran; other modes are returned unchanged."""
    tc = cfg.train
    if tc.sample_mode != "auto":
        return cfg
    out = cfg.model_copy(deep=True)
    if not trains_every_position(cfg.model):
        out.train.sample_mode = "prefix"
        return out
    out.train.sample_mode = "sequence"
    if tc.sequence_batch_size is not None:
        out.train.batch_size = tc.sequence_batch_size
    if tc.sequence_warmup_steps is not None:
        out.train.warmup_steps = tc.sequence_warmup_steps
    return out
