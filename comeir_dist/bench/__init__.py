"""comeir_dist.bench: generation-latency (paper Table 3) and Engram lookup-throughput benchmarks."""
