"""tessera.quant"""
