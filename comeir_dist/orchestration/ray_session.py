"""Connect to the Ray cluster at RAY_ADDRESS (or a given address) or start a local instance.

Without an address (argument or RAY_ADDRESS) a NEW local instance is started (``ray.init(address="local")``):
a bare ``ray.init()`` would instead attach to the cluster named in ``<RAY_TMPDIR or /tmp>/ray/ray_current_cluster``
(written by the last ``ray start``) and fail with "Failed to connect to Ray cluster at <address>" once that
head has died. To use a cluster started with ``ray start``, pass its address or set RAY_ADDRESS (``ray job
submit`` sets it for the job). A local instance has Ray's default token authentication (Ray >= 2.59:
``RAY_AUTH_MODE`` unset = token, the token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token,
generated there if missing) and its dashboard, when started, listens on 127.0.0.1 only.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

from comeir_dist.errors import UserError

log = logging.getLogger(__name__)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, num_cpus: Optional[int] = None,
                dashboard: bool = False) -> Iterator[None]:
    """Use an already-initialised Ray, connect to ``address``/RAY_ADDRESS, or start a local Ray (never the
    cluster of a leftover ``ray_current_cluster`` file, see the module doc).

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
    try:
        if address and address != "local":
            ray.init(address=address, log_to_driver=True)
        else:
            extra = {"dashboard_host": "127.0.0.1", "dashboard_port": _free_port()} if dashboard else {}
            log.info("starting a local Ray instance (no ray.address / RAY_ADDRESS given)")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True, **extra,
                     configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on a startup timeout
        ray.shutdown()  # stop whatever part of a local instance did start
        where = f"connect to the Ray cluster at {address}" if address and address != "local" else \
            "start a local Ray instance"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not {where}: {first} (a machine busy with other work can time out Ray's "
                        f"startup: retry when it is idle, or pass a running cluster's address)") from exc
    try:
        yield
    finally:
        ray.shutdown()
