"""tessera.gateway: an OpenAI-compatible HTTP server over the serving engine.

`create_app(engine, ...)` builds the FastAPI app; `tessera serve --model PATH` (or
`python -m tessera.gateway`) runs it under uvicorn.
"""

from tessera.gateway.app import GatewaySettings, create_app

__all__ = ["GatewaySettings", "create_app"]
