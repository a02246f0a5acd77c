"""Imported once by the forkserver that ``harness.run_ranks`` starts its rank processes from: the heavy imports a
training rank needs (torch, TorchRec, DeepSpeed with the modules it loads lazily, transformers' decoders, the
training loop), so each launch forks ranks that already have them instead of importing them again (seconds per
process). Importing only: no thread pool, process group or accelerator state is created here."""
from __future__ import annotations

import os

from tests.distributed.harness import CHILD_ENV

os.environ.update(CHILD_ENV)  # this process and the ranks forked from it only (set before torch loads its libraries)

import torch  # noqa: E402,F401
import torchrec.distributed  # noqa: E402,F401
import torchrec.distributed.planner  # noqa: E402,F401

from comeir_dist.parallel.dense import prepare_deepspeed  # noqa: E402

prepare_deepspeed(torch.device("cpu"))
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: E402,F401  (loaded by deepspeed.initialize: torch inductor)
from transformers import LlamaModel, Qwen3Model  # noqa: E402,F401  (lazy modules: the decoder backbones)

import comeir_dist.model.factory  # noqa: E402,F401
import comeir_dist.train.loop  # noqa: E402,F401
import comeir_dist.utils.plotting  # noqa: E402,F401
import tests.distributed.workers  # noqa: E402,F401
import tests.fixtures  # noqa: E402,F401
