"""tessera.gateway"""
