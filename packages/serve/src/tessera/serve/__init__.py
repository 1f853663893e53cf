"""tessera.serve"""
