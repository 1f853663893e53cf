"""tessera.jaxref"""
