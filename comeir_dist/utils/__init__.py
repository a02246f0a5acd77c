"""comeir_dist.utils"""
