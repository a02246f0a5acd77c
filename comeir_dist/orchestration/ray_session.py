"""Connect to the Ray cluster at RAY_ADDRESS (or a given address) or start a local instance."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

log = logging.getLogger(__name__)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None,
                dashboard: bool = False) -> Iterator[None]:
    """Use an already-initialised Ray, connect to ``address``/RAY_ADDRESS, or start a local Ray.

    A local instance started here is shut down on exit; an existing connection is left alone.
    ``dashboard``: start the local dashboard too (Ray Train V2's placement-group cleaner polls the state API,
    which the dashboard serves; without it it logs a warning every second).
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
        extra = {"dashboard_host": "127.0.0.1", "dashboard_port": _free_port()} if dashboard else {}
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True, **extra,
                 configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
