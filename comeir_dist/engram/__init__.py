"""comeir_dist.engram"""
