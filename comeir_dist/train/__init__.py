"""comeir_dist.train"""
