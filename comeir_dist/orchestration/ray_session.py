"""Connect to the Ray cluster at RAY_ADDRESS (or a given address) or start a local instance."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None) -> Iterator[None]:
    """Use an already-initialised Ray, connect to ``address``/RAY_ADDRESS, or start a local Ray.

    A local instance started here is shut down on exit; an existing connection is left alone.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
