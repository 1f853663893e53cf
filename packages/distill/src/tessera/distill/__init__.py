"""tessera.distill"""
