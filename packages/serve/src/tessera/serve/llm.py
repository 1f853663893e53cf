"""`LLM`: offline generation over `LLMEngine`.

    llm = LLM("checkpoints/student", draft=None, max_num_seqs=64)
    outs = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tessera.model import Transformer
from tessera.model.tokenizer import Tokenizer
from tessera.serve.engine import LLMEngine, resolve_device
from tessera.serve.loader import load_for_serving, serving_dtype
from tessera.specs import EngineConfig, GenerateRequest, QuantConfig, RequestOutput, SamplingParams, SpeculativeConfig

Prompt = str | list[int]


class LLM:
    """Loads `path` (tessera or HF directory, or a quantized checkpoint) and an optional `draft` model
    for speculative decoding. `overrides` are `EngineConfig` fields (e.g. `max_num_seqs=8`)."""

    def __init__(self, path: str | Path, *, draft: str | Path | None = None, quant: QuantConfig | str | None = None,
                 config: EngineConfig | None = None, **overrides: Any) -> None:
        config = config or EngineConfig()
        if overrides:
            config = EngineConfig.model_validate({**config.model_dump(), **overrides})
        if draft is not None:
            k = config.speculative.num_speculative_tokens if config.speculative else 4
            config = EngineConfig.model_validate({**config.model_dump(), "speculative": SpeculativeConfig(
                method="draft", draft_model=str(draft), num_speculative_tokens=k).model_dump()})
        device = resolve_device(config.device)
        dtype = serving_dtype(config, device)
        draft_model = None
        if config.speculative is not None and config.speculative.method == "draft":
            assert config.speculative.draft_model is not None
            draft_model, _ = load_for_serving(config.speculative.draft_model, device=device, dtype=dtype)
        if config.tensor_parallel_size > 1:
            self.engine = self._launch_tensor_parallel(Path(path), config, quant, draft_model)
        else:
            model, self.tokenizer = load_for_serving(path, device=device, dtype=dtype, quant=quant)
            self.engine = LLMEngine(model, self.tokenizer, config, draft_model=draft_model,
                                    model_name=Path(path).resolve().name)
        self._calls = 0

    def _launch_tensor_parallel(self, path: Path, config: EngineConfig, quant: QuantConfig | str | None,
                                draft_model: Transformer | None) -> LLMEngine:
        """Rank 0's engine over `tensor_parallel_size` ranks (workers spawned here, stopped at exit).
        The draft model, if any, runs unsharded on rank 0."""
        from tessera.serve.tp_engine import launch_tp_engine

        if quant is not None:
            raise ValueError(f"quant={quant!r} cannot be combined with tensor_parallel_size="
                             f"{config.tensor_parallel_size}: quantized layers are not sharded")
        self.tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        self.tensor_parallel = launch_tp_engine(path, config, tokenizer=self.tokenizer, draft_model=draft_model,
                                                model_name=path.resolve().name)
        return self.tensor_parallel.engine

    def generate(self, prompts: str | list[str] | list[list[int]] | list[int],
                 sampling: SamplingParams | list[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt, in prompt order. Raises RequestRejected for a prompt
        that can never be served (nothing is generated then)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        base = self._calls
        self._calls += len(prompts)
        requests = deque(self._request(base + i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params)))
        for r in requests:
            self.engine.check_request(r)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(requests), desc="generate", disable=not progress)
        engine = self.engine
        while requests or engine.has_unfinished():
            while requests and len(engine.scheduler.waiting) + requests[0].sampling.n <= engine.config.max_waiting:
                engine.add_request(requests.popleft(), final_only=True)
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[f"llm-{base + i}"] for i in range(len(prompts))]

    @staticmethod
    def _request(i: int, prompt: Prompt, sampling: SamplingParams) -> GenerateRequest:
        if isinstance(prompt, str):
            return GenerateRequest(request_id=f"llm-{i}", prompt=prompt, sampling=sampling)
        return GenerateRequest(request_id=f"llm-{i}", prompt_token_ids=tuple(prompt), sampling=sampling)
