"""comeir_dist.parallel"""
