"""Tensor-parallel inference on CPU with gloo: TP=2 and TP=4 logits equal TP=1 (fp32, 1e-5) and
greedy generations are identical, for split and for replicated KV heads."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tessera.attn import FlatKVCache
from tessera.model import Transformer
from tessera.model.hf import export_hf, load_hf
from tessera.serve.tensor_parallel import TPLayout, iter_parallel_modules, load_tp_model
from tessera.specs import ModelConfig

CONFIGS = {
    # 4 KV heads: split across 2 and 4 ranks; odd vocabulary: the last rank's rows are padded
    "llama-kv-split": ModelConfig(vocab_size=101, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                                  d_ff=96, rope_theta=10000.0),
    # 2 KV heads on 4 ranks: each KV head replicated; QK-norm and tied embeddings
    "qwen3-kv-replicated": ModelConfig(family="qwen3", vocab_size=97, d_model=64, n_layers=2, n_heads=8,
                                       n_kv_heads=2, head_dim=16, d_ff=64, qk_norm=True, tie_embeddings=True),
}
NEW_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str) -> None:
    """One process of a 4-process gloo world: runs every config at TP=4 (the world) and at TP=2
    (a subgroup of ranks 0 and 1), so a single spawn covers the whole test."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    try:
        pair = dist.new_group([0, 1])
        for name in sorted(CONFIGS):
            out_dir = Path(root) / name
            _run(rank, 4, None, out_dir)
            if rank < 2:
                _run(rank, 2, pair, out_dir)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(rank: int, world: int, group: dist.ProcessGroup | None, out_dir: Path) -> None:
    model = load_tp_model(out_dir / "model", group=group)
    ids = load_file(str(out_dir / "inputs.safetensors"))["ids"]
    with torch.no_grad():
        logits = model(ids)
        # greedy decode through a per-rank cache of local KV heads; rank 0 picks, everyone follows
        cache = FlatKVCache(model.config, batch_size=ids.shape[0], max_len=ids.shape[1] + NEW_TOKENS)
        step = model(ids, positions=cache.positions(ids.shape[1]), kv=cache)
        cache.advance(ids.shape[1])
        generated = []
        for _ in range(NEW_TOKENS):
            nxt = step[:, -1].argmax(-1)
            dist.broadcast(nxt, src=0, group=group)
            generated.append(nxt)
            step = model(nxt[:, None], positions=cache.positions(1), kv=cache)
            cache.advance(1)
    if rank == 0:
        save_file({"logits": logits.contiguous(), "tokens": torch.stack(generated, 1)},
                  str(out_dir / f"tp{world}.safetensors"))
        n_parallel = sum(1 for _ in iter_parallel_modules(model))
        (out_dir / f"tp{world}.json").write_text(json.dumps({"parallel_modules": n_parallel}))


def _greedy(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    seq = ids
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:]


def test_tp_matches_single_process(tmp_path: Path) -> None:
    expected = {}
    for name, cfg in CONFIGS.items():
        out_dir = tmp_path / name
        torch.manual_seed(1)
        reference = Transformer(cfg).eval()
        with torch.no_grad():  # non-trivial norm weights, so their replication is exercised
            for n, p in reference.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        export_hf(reference, out_dir / "model")
        reference = load_hf(out_dir / "model")
        ids = torch.randint(0, cfg.vocab_size, (2, 9))
        save_file({"ids": ids}, str(out_dir / "inputs.safetensors"))
        with torch.no_grad():
            expected[name] = (reference(ids), _greedy(reference, ids))
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=4)
    for name, (want_logits, want_tokens) in expected.items():
        for world in (2, 4):
            got = load_file(str(tmp_path / name / f"tp{world}.safetensors"))
            torch.testing.assert_close(got["logits"], want_logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(got["tokens"], want_tokens), f"{name}: TP={world} greedy tokens differ"
            info = json.loads((tmp_path / name / f"tp{world}.json").read_text())
            # o_proj and down_proj in every block, plus the embedding and the LM head
            assert info["parallel_modules"] == 2 * CONFIGS[name].n_layers + 2


def test_layout_rejects_impossible_splits() -> None:
    cfg = CONFIGS["llama-kv-split"]
    with pytest.raises(ValueError, match="n_heads"):
        TPLayout(cfg, 0, 3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        TPLayout(cfg.model_copy(update={"n_kv_heads": 8, "n_heads": 24}), 0, 3)
    layout = TPLayout(CONFIGS["qwen3-kv-replicated"], 3, 4)
    assert list(layout.q_heads) == [6, 7] and list(layout.kv_heads) == [1]


def test_step_encoding_round_trips() -> None:
    from tessera.serve.model_runner import StepInput
    from tessera.serve.tp_engine import decode_step, encode_step
    from tessera.specs import KVCacheHandle

    step = StepInput([KVCacheHandle(seq_id=7, block_ids=(3, 1), num_tokens=20, block_size=16),
                      KVCacheHandle(seq_id=2, block_ids=(5,), num_tokens=1, block_size=16)],
                     [[11, 12, 13], [4]], [17, 0], [2, 3])
    back = decode_step(encode_step(step))
    assert back.handles == step.handles and back.tokens == step.tokens
    assert list(back.starts) == list(step.starts) and list(back.logit_rows) == list(step.logit_rows)


def test_tp_engine_generates_like_single_process(tmp_path: Path) -> None:
    """`LLM(..., tensor_parallel_size=2)`: rank 0 schedules and samples, a spawned worker runs its shard
    in lockstep; greedy outputs equal the single-process engine's for prompts of different lengths
    (one long enough to need chunked prefill)."""
    from tessera.serve import LLM
    from tessera.specs import SamplingParams

    cfg = CONFIGS["qwen3-kv-replicated"]
    torch.manual_seed(3)
    export_hf(Transformer(cfg), tmp_path / "model")
    prompts = [[5, 6, 7, 8, 9], [1, 2], list(range(10, 40))]
    sampling = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    base = dict(device="cpu", num_blocks=64, block_size=4, max_num_batched_tokens=16, max_model_len=64)
    want = [o.outputs[0].token_ids for o in LLM(tmp_path / "model", **base).generate(prompts, sampling)]
    llm = LLM(tmp_path / "model", tensor_parallel_size=2, **base)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sampling)]
    finally:
        llm.tensor_parallel.close()
    assert got == want
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tmp_path / "model", quant="int8", tensor_parallel_size=2, **base)

