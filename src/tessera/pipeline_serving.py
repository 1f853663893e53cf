"""The pipeline's serving stages: generation with and without the speculative draft (measured, batch 1, greedy),
and the gateway on loopback answering over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.serve import LLM
from tessera.specs import SamplingParams
from tessera.specs.pipeline import PipelineConfig

Say = Callable[[str], None]


def _generate_one_by_one(llm: LLM, prompts: tuple[str, ...], sampling: SamplingParams) -> dict[str, Any]:
    llm.generate(list(prompts[:1]), SamplingParams(temperature=0.0, max_tokens=2))  # warm-up: allocations, caches
    texts, tokens, drafted, accepted = [], 0, 0, 0
    t0 = time.perf_counter()
    for prompt in prompts:
        out = llm.generate(prompt, sampling)[0]
        texts.append(out.outputs[0].text)
        tokens += len(out.outputs[0].token_ids)
        if out.metrics is not None:
            drafted += out.metrics.spec_draft_tokens
            accepted += out.metrics.spec_accepted_tokens
    seconds = time.perf_counter() - t0
    return {"texts": texts, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None}


def serving_stage(cfg: PipelineConfig, teacher_dir: Path, draft_dir: Path | None, quantized_dir: Path,
                  say: Say) -> tuple[dict[str, Any], LLM]:
    """Generate the prompts (batch 1, greedy, `max_tokens` each, EOS ignored so every run makes the same
    number of tokens) with the teacher alone, the teacher + draft, and the quantized student alone.
    Returns the measurements and the teacher + draft `LLM` (for the gateway)."""
    sampling = SamplingParams(temperature=0.0, max_tokens=cfg.serve.max_tokens, ignore_eos=True)
    prompts = cfg.serve.prompts
    say("teacher alone")
    plain = _generate_one_by_one(LLM(teacher_dir, config=cfg.engine_config(teacher_dir, None)), prompts, sampling)
    result: dict[str, Any] = {"prompts": list(prompts), "max_tokens": cfg.serve.max_tokens, "teacher": plain}
    served = LLM(teacher_dir, config=cfg.engine_config(teacher_dir, draft_dir))
    if draft_dir is not None:
        say(f"teacher + draft ({draft_dir.name}, k={cfg.serve.num_speculative_tokens})")
        spec = _generate_one_by_one(served, prompts, sampling)
        spec["speedup"] = plain["seconds"] / spec["seconds"]
        spec["same_text_as_teacher"] = spec["texts"] == plain["texts"]
        spec["draft"] = str(draft_dir)
        spec["num_speculative_tokens"] = cfg.serve.num_speculative_tokens
        result["speculative"] = spec
    say(f"quantized student alone ({cfg.quant.method})")
    small = LLM(quantized_dir, config=cfg.engine_config(quantized_dir, None))
    result["quantized_student"] = _generate_one_by_one(small, prompts, sampling)
    return result, served


def http_stage(cfg: PipelineConfig, served: LLM, offline: dict[str, Any], say: Say) -> dict[str, Any]:
    """Serve `served` through the gateway on `cfg.gateway`, ask a completion of the first prompt and a streaming
    chat with the second (the first when there is one), then stop. The completion must agree with the offline
    greedy text of the same prompt (a prefix of it: HTTP requests stop at EOS)."""
    from tessera.loopback import Loopback, ask
    from tessera.serve import AsyncEngine

    prompts = cfg.serve.prompts
    server = Loopback(AsyncEngine(served.engine), host=cfg.gateway.host, port=cfg.gateway.port,
                      served_model_name="teacher").start()
    say(f"listening on {server.url}")
    try:
        result = ask(server, prompts[0], prompts[min(1, len(prompts) - 1)], cfg.serve.max_tokens, say=say)
    finally:
        stopped = server.stop()
    result["completion"]["matches_offline_greedy"] = offline["texts"][0].startswith(result["completion"]["text"])
    result.update(stopped)
    say(f"stopped: server {'yes' if stopped['server_stopped'] else 'NO'}, "
        f"engine {'yes' if stopped['engine_stopped'] else 'NO'}")
    return result
