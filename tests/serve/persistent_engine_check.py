"""Run under TRITON_INTERPRET=1: the serving engine (one sequence at a time, so every decode step is batch 1)
with the persistent decode launch switched on generates the same greedy tokens as with it off, and the
launch ran. Prints `persistent-engine-ok`."""

from __future__ import annotations

import torch

from tessera.model import Transformer, persistent
from tessera.serve.engine import LLMEngine
from tessera.specs import EngineConfig, GenerateRequest, ModelConfig, SamplingParams


def generate(model: Transformer, prompts: list[list[int]], on: bool) -> tuple[list[list[int]], LLMEngine]:
    persistent.PERSISTENT_DECODE = on
    eng = LLMEngine(model, None, EngineConfig(num_blocks=32, block_size=4, max_num_seqs=1, max_num_batched_tokens=64))
    for i, p in enumerate(prompts):
        eng.add_request(GenerateRequest(request_id=f"r{i}", prompt_token_ids=tuple(p),
                                        sampling=SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)))
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[f"r{i}"] for i in range(len(prompts))], eng


def main() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64,
                      qk_norm=True, max_seq_len=128, init_std=0.5)
    model = Transformer(cfg).eval()
    prompts = [[5, 17, 3, 88, 41, 9, 60], [2, 71, 33]]
    want, _ = generate(model, prompts, False)
    got, eng = generate(model, prompts, True)
    assert got == want, f"persistent {got} != per-op {want}"
    assert persistent.launch_built(eng.runner.cache), "the persistent launch never ran"
    assert persistent.barrier_failures(model) == 0
    print("persistent-engine-ok")


if __name__ == "__main__":
    main()
