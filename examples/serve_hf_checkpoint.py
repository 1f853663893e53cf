"""Serve a Hugging Face Llama or Qwen checkpoint directory with `tessera.serve.LLM`.

    python examples/serve_hf_checkpoint.py /path/to/Llama-3.2-1B      # config.json + *.safetensors + tokenizer.json
    python examples/serve_hf_checkpoint.py --family qwen3 [--tiny]     # no path: build a small one first

Without a path, a small random-weight model of the family is built with `transformers` (and a byte-level BPE
tokenizer trained on the standard library's docstrings) and saved as an HF directory, so this runs offline.
The same prompts are then generated greedily by tessera (paged KV cache, continuous batching) and by
`transformers.generate`, and the token ids are compared: tessera serves the checkpoint as HF computes it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tessera.serve import LLM
from tessera.specs import SamplingParams

PROMPTS = ["Return the number of", "This module provides", "Raise an error if the"]


def build_hf_dir(directory: Path, family: str, tiny: bool) -> Path:
    """A random-weight HF model of `family` ("llama" or "qwen3") with a trained tokenizer, saved in `directory`."""
    import transformers

    from tessera.distill.corpus import builtin_corpus
    from tessera.model.tokenizer import Tokenizer

    vocab = 512 if tiny else 2048
    tokenizer = Tokenizer.train(builtin_corpus(200_000), vocab)
    dims = dict(vocab_size=vocab, hidden_size=64 if tiny else 256, intermediate_size=128 if tiny else 704,
                num_hidden_layers=2 if tiny else 4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, initializer_range=0.2, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id)
    if family == "qwen3":
        config = transformers.Qwen3Config(head_dim=dims["hidden_size"] // 4, **dims)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**dims)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_dir(directory)
    return directory


def hf_greedy(directory: Path, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", type=Path, help="HF model directory (default: build a small one)")
    ap.add_argument("--family", choices=["llama", "qwen3"], default="llama", help="family of the built model")
    ap.add_argument("--tiny", action="store_true", help="build a tiny model (seconds)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per prompt (default: 8 tiny, 32 otherwise)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--no-compare", action="store_true", help="skip the comparison with transformers.generate")
    args = ap.parse_args(argv)
    max_tokens = args.max_tokens or (8 if args.tiny else 32)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            path = build_hf_dir(Path(tmp) / f"tiny-{args.family}", args.family, args.tiny)
            print(f"built a random-weight {args.family} checkpoint in {path}")
        t0 = time.perf_counter()
        llm = LLM(path, device=args.device, dtype="float32", max_num_seqs=8, kv_cache_bytes=32 * 2**20)
        print(f"loaded {path} in {time.perf_counter() - t0:.1f} s: {llm.engine.runner.model.config.family}, "
              f"{llm.engine.runner.model.config.num_params() / 1e6:.2f}M parameters")
        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(PROMPTS, sampling)
        seconds = time.perf_counter() - t0
        for out in outs:
            print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s, {len(PROMPTS)} prompts batched)")
        if not args.no_compare and llm.engine.device.type == "cpu":
            want = hf_greedy(path, [list(o.prompt_token_ids) for o in outs], max_tokens)
            same = [list(o.outputs[0].token_ids) == w for o, w in zip(outs, want)]
            print(f"greedy token ids equal to transformers.generate: {sum(same)}/{len(same)} prompts")
            if not all(same):
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
