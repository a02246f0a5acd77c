"""comeir_dist.decode"""
