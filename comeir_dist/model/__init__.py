"""comeir_dist.model"""
