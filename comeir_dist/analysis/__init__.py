"""Analyses of a prepared dataset and of finished runs (`comeir analyze ...`).

* :mod:`comeir_dist.analysis.memgen` - memorization / generalization labels of next-item instances
  (Ding et al., "How Well Does Generative Recommendation Generalize?"), vectorised with numpy.
* :mod:`comeir_dist.analysis.runs` - per-user results of runs, Hit/NDCG per group with bootstrap CIs.
* :mod:`comeir_dist.analysis.memgen_report` - the `comeir analyze memgen` command body (labels Parquet,
  summary JSON, markdown, plot).
"""
from __future__ import annotations

ANALYSIS_KIND = "analysis"  # its output-dir kind (comeir_dist.utils.output_guard.KINDS)
