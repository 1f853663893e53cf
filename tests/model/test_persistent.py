"""The persistent decode launch (`tessera.model.persistent`, opt-in): what it refuses, that a refused step
takes the per-op path, its arithmetic against that path under the interpreter, and on a GPU its logits
eager and replayed from a CUDA graph."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tessera.attn import PagedAttentionMetadata, PagedKVCache, PagedKVContext
from tessera.model import Transformer, fuse_projections, persistent
from tessera.specs import KVCacheHandle, KVCacheSpec, ModelConfig

CFG = ModelConfig(vocab_size=61, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, qk_norm=True,
                  max_seq_len=64)


def _decode_context(cfg: ModelConfig, device: str = "cpu") -> PagedKVContext:
    spec = KVCacheSpec(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim or 16, block_size=4,
                       num_blocks=4, dtype="float32")
    handle = KVCacheHandle(seq_id=0, block_ids=(1, 2), num_tokens=6, block_size=4)
    return PagedKVContext(PagedKVCache(spec, device=device), PagedAttentionMetadata.from_handles([handle], [1]))


def test_reasons_name_what_the_launch_cannot_take() -> None:
    model = Transformer(CFG).eval()
    ids = torch.tensor([[3]])
    with torch.inference_mode():
        assert any("fuse_projections" in r for r in persistent.reasons(model, ids, _decode_context(CFG)))
        fuse_projections(model)
        found = persistent.reasons(model, ids, _decode_context(CFG))
        assert found == [] or found == ["needs a CUDA device (or TRITON_INTERPRET=1)"]
        assert any("one token of one sequence" in r for r in persistent.reasons(model, torch.tensor([[3, 4]]),
                                                                                  _decode_context(CFG)))
        assert any("PagedKVContext" in r for r in persistent.reasons(model, ids, None))
    assert any("gradients" in r for r in persistent.reasons(model, ids, _decode_context(CFG)))
    odd = ModelConfig(vocab_size=61, d_model=48, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=16, d_ff=64,
                      attention_bias=True, max_seq_len=64)
    biased = Transformer(odd).eval()
    fuse_projections(biased)
    with torch.inference_mode():
        found = persistent.reasons(biased, ids, _decode_context(odd))
    assert "attention biases" in found
    assert "d_model=48 is not a power of two" in found and "n_heads // n_kv_heads=3 is not a power of two" in found


def test_reasons_name_a_table_entry_the_kernel_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reads each pointer-table entry as a dense tensor at a 16-byte aligned address: one that is
    not is named (layer and entry), so the step takes the per-op path instead of failing."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check; nothing is launched
    model = Transformer(CFG).eval()
    fuse_projections(model)
    ids = torch.tensor([[3]])
    with torch.inference_mode():
        assert persistent.reasons(model, ids, _decode_context(CFG)) == []
        norm = model.model.layers[1].input_layernorm
        norm.weight = nn.Parameter(torch.cat([torch.zeros(1), norm.weight.detach()])[1:])  # 4 bytes in
        attn = model.model.layers[0].self_attn
        attn.k_norm.weight = nn.Parameter(torch.ones(2 * CFG.head_dim)[::2])  # every other element
        found = persistent.reasons(model, ids, _decode_context(CFG))
    assert len(found) == 2, found
    assert found[0] == "layer 0: k norm weight is not contiguous"
    assert found[1].startswith("layer 1: input norm weight is not 16-byte aligned (address 0x")


def test_a_refused_step_takes_the_per_op_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched on, a step the launch cannot take (here: two tokens, a prefill) gives the per-op output."""
    monkeypatch.setattr(persistent, "PERSISTENT_DECODE", True)
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    fuse_projections(model)
    ids = torch.randint(0, 61, (1, 5))
    with torch.inference_mode():
        want = model(ids)
        spec = KVCacheSpec(n_layers=2, n_kv_heads=2, head_dim=16, block_size=4, num_blocks=4, dtype="float32")
        meta = PagedAttentionMetadata.from_handles([KVCacheHandle(seq_id=0, block_ids=(2, 0), num_tokens=5,
                                                                  block_size=4)], [5])
        got = model(ids, kv=PagedKVContext(PagedKVCache(spec), meta))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "_persistent_decode" not in model.__dict__  # no launch was built


def test_persistent_launch_matches_the_per_op_path_under_the_interpreter(run_check) -> None:
    pytest.importorskip("triton")
    run_check("persistent_decode_check.py", "persistent-ok", interpret="always")


@pytest.mark.gpu
def test_persistent_launch_on_the_gpu_eager_and_in_a_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Qwen3-0.6B-wide model (4 layers, bf16): one decode step's logits through the persistent launch
    (all programs resident, no barrier given up, every head's splits merged once) against the per-op path,
    eager (also with the tuning variants the benchmarks time: two weight tiles in flight, no prefetch across
    barriers, acquire-load polls, L2 prefetch ahead, fewer context splits, per-head readiness instead of a
    barrier, clock stamps) and replayed from a graph."""
    cfg = ModelConfig(vocab_size=1000, d_model=1024, n_layers=4, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=3072,
                      qk_norm=True, max_seq_len=1024)
    torch.manual_seed(0)
    model = Transformer(cfg).eval().to("cuda", torch.bfloat16)
    fuse_projections(model)
    spec = KVCacheSpec(n_layers=4, n_kv_heads=8, head_dim=128, block_size=16, num_blocks=64, dtype="bfloat16")
    cache = PagedKVCache(spec, device="cuda")
    blocks = tuple(range(63, 23, -1))  # 40 blocks, out of order
    prompt = torch.randint(0, 1000, (1, 300), device="cuda")
    with torch.inference_mode():
        meta = PagedAttentionMetadata.from_handles([KVCacheHandle(seq_id=0, block_ids=blocks, num_tokens=300,
                                                                  block_size=16)], [300], device="cuda")
        model(prompt, kv=PagedKVContext(cache, meta))
        saved = [t.clone() for t in cache.k + cache.v]
        meta = PagedAttentionMetadata.from_handles([KVCacheHandle(seq_id=0, block_ids=blocks, num_tokens=301,
                                                                  block_size=16)], [1], device="cuda")
        ids, pos = torch.tensor([[7]], device="cuda"), torch.tensor([[300]], device="cuda")
        want = model(ids, positions=pos, kv=PagedKVContext(cache, meta)).float()
        for t, s in zip(cache.k + cache.v, saved):
            t.copy_(s)
        monkeypatch.setattr(persistent, "PERSISTENT_DECODE", True)
        kv = PagedKVContext(cache, meta)
        assert persistent.reasons(model, ids, kv) == []
        got = model(ids, positions=pos, kv=kv).float()
        assert persistent.launch_built(cache), "the persistent launch did not run"
        assert persistent.barrier_failures(model) == 0 and persistent.unmerged_heads(model) == 0
        scale = want.abs().max()
        assert (got - want).abs().max() <= 0.03 * scale, float((got - want).abs().max() / scale)
        # the variants the benchmarks time
        for options in ({"DEPTH": 2}, {"PREFETCH": False}, {"POLL": 1}, {"POLL": 1, "DEPTH": 2}, {"L2_AHEAD": 1},
                        {"L2_AHEAD": 2, "POLL": 1}, {"SPLITS": 4, "POLL": 1}, {"HEAD_READY": 1},
                        {"HEAD_READY": 1, "POLL": 1, "L2_AHEAD": 2}, {"POLL": 2}, {"POLL": 2, "HEAD_READY": 1},
                        {"TIMED": 1}):
            monkeypatch.setattr(persistent, "OPTIONS", options)
            other = model(ids, positions=pos, kv=kv).float()
            assert persistent.barrier_failures(model) == 0 and persistent.unmerged_heads(model) == 0
            assert persistent.unready_heads(model) == 0
            assert (other - want).abs().max() <= 0.03 * scale, (options, float((other - want).abs().max() / scale))
        profile = persistent.phase_profile(model)  # the TIMED launch's stamps: every phase took time
        assert profile["layers"] == 4 and 0 < profile["span_us"] < 1e5, profile
        assert all(profile[name]["work_us_mean"] > 0 and profile[name]["barrier_us_least"] >= 0
                   for name in persistent.PHASES), profile
        monkeypatch.setattr(persistent, "OPTIONS", {})
        model(ids, positions=pos, kv=kv)  # the default launch again, eagerly, before the capture
        out = torch.empty_like(got)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(model(ids, positions=pos, kv=kv).float())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got) and persistent.barrier_failures(model) == 0


def test_phase_profile_reads_the_stamps() -> None:
    """Two layers over two programs whose clocks run 2 cycles a nanosecond: phase k of layer l starts at
    1000 (l + 1) + 100 k ns and takes 20 + 10 p ns on program p; the launch runs from 0 to 4000 ns."""
    layers, programs = 2, 2
    t = torch.zeros(10 * layers + 4, programs, dtype=torch.int64)
    for layer in range(layers):
        for k in range(5):
            for p in range(programs):
                start = 1000 * (layer + 1) + 100 * k
                t[10 * layer + 2 * k, p] = 2 * start
                t[10 * layer + 2 * k + 1, p] = 2 * (start + 20 + 10 * p)
    t[10 * layers] = 0  # the GPU timer at the start, then the clock
    t[10 * layers + 1] = 0
    t[10 * layers + 2] = 4000
    t[10 * layers + 3] = 8000
    launch = SimpleNamespace(options={"TIMED": 1}, scratch={"times": t})
    model = SimpleNamespace()
    model._persistent_timed = lambda: launch  # as the weak reference `hidden` leaves
    profile = persistent.phase_profile(model)
    assert profile["layers"] == 2 and profile["programs"] == 2 and profile["span_us"] == 4.0
    assert profile["qkv"]["work_us_mean"] == pytest.approx(0.025)  # 20 and 30 ns
    assert profile["qkv"]["work_us_slowest"] == pytest.approx(0.030)
    assert profile["qkv"]["barrier_us_mean"] == pytest.approx(0.075)  # 80 and 70 ns to the next start
    assert profile["qkv"]["barrier_us_least"] == pytest.approx(0.070)
    # after layer 0's down: layer 1's start (1000 - 400 - 20 - 10 p ns); after layer 1's: the launch's end
    assert profile["down"]["barrier_us_least"] == pytest.approx((0.570 + (4.000 - 2.430)) / 2)
    assert persistent.phase_profile(SimpleNamespace()) == {}


def test_the_splits_option_sets_the_work_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """OPTIONS SPLITS: the context splits a kv head (attention's work items, the merge's partials), not a kernel
    argument of its own; the module's SPLITS (tests) wins over it."""
    # past the device check without setting TRITON_INTERPRET: building the launch imports the kernel module,
    # and Triton decorates kernels for the interpreter or the GPU once, at import, for the whole process
    monkeypatch.setattr(persistent, "_interpreting", lambda: True)
    model = Transformer(CFG).eval()
    fuse_projections(model)
    kv = _decode_context(CFG)
    step = persistent._step(kv)
    with torch.inference_mode():
        problems, table = persistent._check(model, torch.tensor([[3]]), step)
    assert problems == []
    monkeypatch.setattr(persistent, "OPTIONS", {"SPLITS": 4})
    launch = persistent._launch_for(model, step, table)
    assert (launch.splits, launch.meta["S"], launch.meta["SP"]) == (4, 4, 4) and "SPLITS" not in launch.meta
    assert launch.scratch["part"].numel() == CFG.n_kv_heads * 4 * 2 * (CFG.head_dim + 2)  # 2 queries a kv head
    monkeypatch.setattr(persistent, "SPLITS", 3)
    assert persistent._launch_for(model, step, table).meta["S"] == 3
    # HEAD_READY counts q/k/v tiles a head: a tile must not straddle two heads
    monkeypatch.setattr(persistent, "OPTIONS", {"HEAD_READY": 1, "BN_QKV": 32})
    with pytest.raises(ValueError, match="HEAD_READY=1 needs q/k/v tiles within one head: BN_QKV=32 does not "
                                         "divide head_dim=16"):
        persistent._launch_for(model, step, table)


def test_options_are_checked_and_parsed() -> None:
    assert persistent.parse_options("") == {}
    assert persistent.parse_options("DEPTH=2, PREFETCH=false,num_warps=4,TILE=8192") == {
        "DEPTH": 2, "PREFETCH": False, "num_warps": 4, "TILE": 8192}
    with pytest.raises(ValueError, match=r"unknown \['DEPT'\]"):
        persistent.parse_options("DEPT=2")
    with pytest.raises(ValueError, match="DEPTH=3: expected 1 or 2"):
        persistent.check_options({"DEPTH": 3})
    with pytest.raises(ValueError, match="BN_O=12: expected a power of two"):
        persistent.parse_options("BN_O=12")
    with pytest.raises(ValueError, match="PREFETCH=1: expected true or false"):
        persistent.parse_options("PREFETCH=1")
    with pytest.raises(ValueError, match="POLL=3: expected 0, 1 or 2"):
        persistent.parse_options("POLL=3")
    assert persistent.parse_options("L2_AHEAD=3") == {"L2_AHEAD": 3}
    with pytest.raises(ValueError, match="HEAD_READY=2: expected 0 or 1"):
        persistent.parse_options("HEAD_READY=2")
    with pytest.raises(ValueError, match="L2_AHEAD=4: expected 0, 1, 2 or 3"):
        persistent.parse_options("L2_AHEAD=4")
    with pytest.raises(ValueError, match="'BT' is not KEY=VALUE"):
        persistent.parse_options("BT")
    with pytest.raises(ValueError, match="'BT=x': the value is not an integer"):
        persistent.parse_options("BT=x")
