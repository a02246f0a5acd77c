"""comeir_dist.eval"""
