"""comeir_dist.orchestration"""
