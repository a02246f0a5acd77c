import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# one OpenMP/BLAS thread per test process (and its children), set before torch/numpy load: `make test` runs 2
# test processes on 2 cores, so a second intra-op thread only oversubscribes the cores -- and on a loaded machine
# every tiny op's OpenMP barrier then waits for a descheduled thread (a 45 s test file took over 15 min)
os.environ.setdefault("OMP_NUM_THREADS", "1")
