"""What every command-line entry point (the `comeir` CLI and the scripts in jobs/) does around its body:
environment defaults, logging, and the mapping of user errors to a one-line message and exit code 2."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from comeir_dist.errors import UserError

# Nothing is downloaded at run time; Ray does not phone home.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def set_env_defaults() -> None:
    """Offline defaults, plus DS_ACCELERATOR=cpu on a machine without CUDA (DeepSpeed reads it at import;
    on a GPU machine it is left unset so DeepSpeed picks CUDA). Values already set by the user win."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if "DS_ACCELERATOR" not in os.environ:
        from comeir_dist.parallel.dist_env import cuda_device_count

        if not cuda_device_count():  # asks the one device-selection module
            os.environ["DS_ACCELERATOR"] = "cpu"


def configure_logging(verbose: bool = False) -> None:
    """Our loggers at INFO (DEBUG with --verbose); third-party ones (torchrec/fbgemm log kernel details at
    INFO on the root logger) at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("comeir_dist").setLevel(logging.DEBUG if verbose else logging.INFO)


def run_entry(prog: str, body: Callable[[], int], *, verbose: bool = False,
              interrupted: str = "interrupted") -> int:
    """Run ``body`` as the program ``prog``: user errors print ``prog: error: ...`` and return 2 (no
    traceback), Ctrl-C prints ``prog: <interrupted>`` and returns 130."""
    set_env_defaults()
    configure_logging(verbose)
    try:
        return body()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
