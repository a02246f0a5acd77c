"""comeir_dist.data"""
