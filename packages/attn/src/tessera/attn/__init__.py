"""tessera.attn"""
