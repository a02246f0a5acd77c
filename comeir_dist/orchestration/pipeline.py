"""The preprocessing chain prepare -> embed -> quantize, shared by jobs/preprocess.py and jobs/demo.py."""
from __future__ import annotations

import logging
from pathlib import Path

from comeir_dist.config.pipeline import PipelineConfig
from comeir_dist.orchestration.ray_session import ray_session

log = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig, methods: list[str] | None = None, reuse_prepared: bool = True) -> Path:
    """Run the three stages (embedding is cached; quantize runs for each method). Returns the dataset dir."""
    from comeir_dist.data.prepare import run_prepare
    from comeir_dist.quant.embed import run_embed
    from comeir_dist.quant.run import run_quantize

    out = Path(cfg.prepare.out)
    with ray_session(cfg.ray_address, cfg.ray_num_cpus):
        if not (reuse_prepared and (out / "stats.json").is_file()):
            run_prepare(cfg.prepare)
        else:
            log.info("prepare: %s exists, reused (delete it to rebuild)", out)
        run_embed(out, cfg.embed, ray_address=cfg.ray_address, ray_num_cpus=cfg.ray_num_cpus)
        for method in methods or [cfg.quantize.method]:
            qcfg = cfg.quantize.model_copy(update={"method": method})
            run_quantize(out, qcfg, ray_address=cfg.ray_address, ray_num_cpus=cfg.ray_num_cpus)
    return out
