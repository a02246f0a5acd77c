"""comeir_dist.quant"""
