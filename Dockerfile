# Cluster node image: the CUDA install profile (requirements-cuda.txt) + this repo, for Ray head and GPU
# worker nodes. It has never been built here (no Docker, no GPU, no access to the PyTorch wheel index);
# tests/unit/test_install_profiles.py checks that its base image and pins match requirements-cuda.txt.
#   docker build -t comeir-dist:cuda .
#   docker run --gpus all --network host --shm-size 16g -v /shared:/shared comeir-dist:cuda \
#       ray start --head --port=6379 --dashboard-host=0.0.0.0 --block        # head node
#   ... ray start --address=HEAD:6379 --num-gpus=8 --block                  # every GPU node
# then submit as in README "Multi-node cluster" (`ray job submit --working-dir . -- python jobs/...`).
# CUDA 12.6 runtime = the cu126 builds of torch 2.13.0 / fbgemm-gpu 1.8.0 pinned in requirements-cuda.txt
# (for cu130 pins use nvidia/cuda:13.0.x-cudnn-runtime-ubuntu22.04). The runtime image has no nvcc: DeepSpeed
# ops are JIT-compiled (DS_BUILD_OPS=0) and the CPU-side ones need only g++/ninja; for CUDA ops such as FusedAdam
# (unused by default: the dense optimizer is torch AdamW) build FROM the matching -cudnn-devel- image instead.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DS_BUILD_OPS=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0

# python3.11 (as on the CPU machines), a compiler + ninja for DeepSpeed's JIT ops, tools Ray's autoscaler and
# `ray job submit --working-dir` expect on a node (rsync, ssh client, procps).
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev g++ ninja-build git rsync openssh-client procps curl \
        ca-certificates && \
    rm -rf /var/lib/apt/lists/* && \
    python3.11 -m venv $VIRTUAL_ENV && \
    pip install --upgrade pip

WORKDIR /opt/comeir-dist
# the pinned stack first (its own layer: code changes do not reinstall it). torchrec comes from the file too:
# with the CUDA fbgemm-gpu its metadata is satisfied, so no --no-deps step is needed here.
COPY requirements-cuda.txt ./
RUN pip install -r requirements-cuda.txt && pip check

# the package, editable as `make setup` installs it (configs/ and the repo-relative defaults stay in place)
COPY . .
RUN pip install --no-deps --no-build-isolation -e . && comeir --help > /dev/null

CMD ["bash"]
