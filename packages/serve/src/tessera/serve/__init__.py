"""tessera.serve: a paged-KV continuous-batching engine with prefix caching, preemption, a full
sampler, speculative decoding and CUDA-graph decode.

    from tessera.serve import LLM
    llm = LLM("checkpoints/student")                  # tessera or HF directory
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))

`AsyncEngine` streams the same engine to asyncio callers (the HTTP gateway).
"""

from tessera.serve.async_engine import AsyncEngine
from tessera.serve.block_manager import BlockManager, OutOfBlocks
from tessera.serve.engine import EngineStats, LLMEngine
from tessera.serve.errors import EngineDeadError, EngineOverloaded, RequestRejected
from tessera.serve.llm import LLM
from tessera.serve.sampler import Sampler
from tessera.serve.scheduler import Scheduler

__all__ = [
    "LLM",
    "AsyncEngine",
    "BlockManager",
    "EngineDeadError",
    "EngineOverloaded",
    "EngineStats",
    "LLMEngine",
    "OutOfBlocks",
    "RequestRejected",
    "Sampler",
    "Scheduler",
]
