"""Scaling studies (paper Section 4.4, App. C.2): train + evaluate a grid of Engram scales s_T x s_S,
record P_S / P_T, metrics, wall time and peak memory per point (resumable), fit Hit@5 = a * P^b."""
from comeir_dist.scaling.fit import PowerLawFit, fit_power_law  # noqa: F401
from comeir_dist.scaling.grid import ScalingSettings, build_grid, parse_scales, plan_points  # noqa: F401
from comeir_dist.scaling.sweep import SweepResult, format_grid, prepare_grid, run_sweep  # noqa: F401
