"""Tiny random models (and a tokenizer trained here) for the serve tests."""

from __future__ import annotations

import pytest
import torch

from tessera.model import Transformer
from tessera.model.tokenizer import Tokenizer
from tessera.serve.engine import LLMEngine
from tessera.specs import EngineConfig, GenerateRequest, ModelConfig, RequestOutput, SamplingParams

VOCAB = 97

# These shapes are far too small for intra-op parallelism to pay; extra threads only spin on shared cores.
torch.set_num_threads(1)


def tiny_config(vocab: int = VOCAB, **kw) -> ModelConfig:
    args = dict(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256)
    args.update(kw)
    return ModelConfig(**args)


def random_model(seed: int, cfg: ModelConfig | None = None, std: float = 0.5) -> Transformer:
    """Random weights with a large init scale, so that logits are far from uniform (greedy is decisive)."""
    torch.manual_seed(seed)
    cfg = cfg or tiny_config(init_std=std)
    return Transformer(cfg).eval()


@pytest.fixture(scope="session")
def model() -> Transformer:
    return random_model(0)


@pytest.fixture(scope="session")
def draft() -> Transformer:
    return random_model(1, tiny_config(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, init_std=0.5))


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    texts = [(w + " ") * 3 for w in "the quick brown fox jumps over the lazy dog while seven wizards "
             "hum softly and every bright star sings of distant oceans".split()] * 20
    return Tokenizer.train(texts, vocab_size=300)


def engine(model: Transformer, tokenizer=None, draft_model=None, **cfg) -> LLMEngine:
    args = dict(num_blocks=64, block_size=4, max_num_seqs=16, max_num_batched_tokens=64)
    args.update(cfg)
    return LLMEngine(model, tokenizer, EngineConfig(**args), draft_model=draft_model)


def run(eng: LLMEngine, prompts, params: SamplingParams | list[SamplingParams], max_steps: int = 10_000,
        ) -> list[RequestOutput]:
    """Add every prompt (token lists or strings), step to completion, return final outputs in order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    base = len(eng.requests) + id(prompts) % 100_000 * 1000
    for i, (p, sp) in enumerate(zip(prompts, params)):
        kind = {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": tuple(p)}
        eng.add_request(GenerateRequest(request_id=f"q{base + i}", sampling=sp, **kind))
    done = {}
    for _ in range(max_steps):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert not eng.has_unfinished(), "engine did not finish"
    return [done[f"q{base + i}"] for i in range(len(prompts))]


def full_forward_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The model's own greedy decode, re-running the whole sequence every step (no cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]
