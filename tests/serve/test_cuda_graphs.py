"""On a GPU: CUDA-graph decode equals eager decode token for token, and target-as-own-draft accepts every
draft token on the graph path. Anywhere: the layout of a replay's host inputs."""

from __future__ import annotations

import pytest
import torch

from tessera.specs import SpeculativeConfig

from .conftest import engine, random_model, run, tiny_config
from .helpers import counting
from .test_engine import GREEDY, prompts

# Shapes the GPU kernels take (head_dim 16, 16-token blocks): with the conftest's head_dim of 8 the paged
# attention falls back to its host-syncing reference, which no CUDA graph can capture.
GPU_SHAPES = dict(num_blocks=32, block_size=16)


def gpu_model() -> torch.nn.Module:
    return random_model(0, tiny_config(d_model=64, init_std=0.5)).to("cuda")


@pytest.mark.gpu
def test_graph_capture_names_a_host_syncing_op() -> None:
    eng = engine(random_model(0).to("cuda"), cuda_graph_batch_sizes=(1, 2))  # head_dim 8: reference attention
    assert eng.runner.graphs is None
    assert "synchroniz" in eng.runner.graph_error and "attention_decode_paged" in eng.runner.graph_error


@pytest.mark.gpu
def test_graph_decode_equals_eager_and_self_draft_accepts_all() -> None:
    model = gpu_model()
    ps = prompts(6, seed=21)
    eager = run(engine(model, enforce_eager=True, **GPU_SHAPES), ps, GREEDY)
    graphed_engine = engine(model, cuda_graph_batch_sizes=(1, 2, 4, 8), **GPU_SHAPES)
    assert graphed_engine.runner.graphs is not None, graphed_engine.runner.graph_error
    graphed = run(graphed_engine, ps, GREEDY)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]
    spec = SpeculativeConfig(method="draft", draft_model="self", num_speculative_tokens=4)
    eng = engine(model, draft_model=model, speculative=spec, cuda_graph_batch_sizes=(1, 2, 4, 8), **GPU_SHAPES)
    assert eng.proposer.runner.graphs is not None
    outs = run(eng, ps, GREEDY)
    assert all(o.metrics.acceptance_rate == 1.0 for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculative_rounds_replay_multi_token_graphs(method: str) -> None:
    """Verification (k + 1 tokens a sequence) replays its own graphs, and so does the draft (its
    chain of k greedy steps), and the output equals eager plain greedy token for token."""
    model = gpu_model()
    ps = prompts(6, seed=23)
    eager = run(engine(model, enforce_eager=True, **GPU_SHAPES), ps, GREEDY)
    spec = SpeculativeConfig(method=method, draft_model="self" if method == "draft" else None,
                             num_speculative_tokens=3)
    eng = engine(model, draft_model=model if method == "draft" else None, speculative=spec,
                 cuda_graph_batch_sizes=(1, 2, 4, 8), **GPU_SHAPES)
    assert eng.runner.multi_graphs is not None, eng.runner.graph_error
    replays = [counting(eng.runner.multi_graphs, "run_tokens")]
    if method == "draft":
        chain = eng.proposer.runner.chain
        assert chain is not None and sorted(chain.graphs) == [1, 2, 4, 8], eng.proposer.runner.graph_error
        replays.append(counting(chain, "run"))
    outs = run(eng, ps, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
    assert all(c[0] > 0 for c in replays), replays
    if method == "draft":
        assert all(o.metrics.acceptance_rate == 1.0 for o in outs)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_draft_chain_graph_equals_the_round_by_round_path() -> None:
    """A distinct draft model: the chain's graphs, the chain run eagerly and the round-by-round path
    propose the same drafts (equal acceptance counts), and all three equal plain greedy."""
    model = gpu_model()
    draft = random_model(1, tiny_config(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, init_std=0.5)).to("cuda")
    ps = prompts(5, seed=24)
    eager = run(engine(model, enforce_eager=True, **GPU_SHAPES), ps, GREEDY)
    spec = SpeculativeConfig(method="draft", draft_model="d", num_speculative_tokens=4)
    results = []
    for graphs, chained in ((True, True), (False, True), (True, False)):
        eng = engine(model, draft_model=draft, speculative=spec, enforce_eager=not graphs,
                     cuda_graph_batch_sizes=(1, 2, 4, 8), **GPU_SHAPES)
        eng.chain_rounds = chained
        assert bool(eng.proposer.runner.chain.graphs) == graphs, eng.proposer.runner.graph_error
        calls = counting(eng.proposer.runner.chain, "run")
        outs = run(eng, ps, GREEDY)
        assert (calls[0] > 0) == chained
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
        results.append([(o.metrics.spec_draft_tokens, o.metrics.spec_accepted_tokens) for o in outs])
    assert results[0] == results[1] == results[2]
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_overlapped_decode_on_the_gpu_equals_step_by_step() -> None:
    """Graph replays and eager forwards fed the previous step's tokens on the device (overlapped decode)
    give the outputs of step-by-step decode: greedy, seeded sampling, logprobs."""
    from tessera.specs import SamplingParams

    model = gpu_model()
    ps = prompts(6, seed=25)
    params = [GREEDY, SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=3, logprobs=2, ignore_eos=True)]
    for sp in params:
        for graphs in (True, False):
            results = []
            for overlap in (False, True):
                eng = engine(model, enforce_eager=not graphs, cuda_graph_batch_sizes=(1, 2, 4, 8), **GPU_SHAPES)
                assert (eng.runner.graphs is not None) == graphs, eng.runner.graph_error
                eng.overlap = overlap
                outs = run(eng, ps, sp)
                assert (eng.overlapped_steps > 0) == overlap
                results.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs])
                assert eng.bm.num_free_blocks == eng.num_blocks
            assert results[0] == results[1]
    torch.cuda.synchronize()


def test_host_inputs_layout() -> None:
    from tessera.serve.cuda_graphs import host_inputs

    host, host32 = host_inputs([7, 8], [33, -1], [5, 2], [6, 3], [[4, 1], [9]], 3, 0, pin=False)
    assert host.dtype == torch.int64 and host.tolist() == [[7, 8], [33, -1], [5, 2]]
    assert host32.dtype == torch.int32
    assert host32[:2].tolist() == [6, 3] and host32[2:].view(2, 3).tolist() == [[4, 1, 0], [9, 0, 0]]


def test_take_rows_is_identity_for_all_rows_in_order_else_a_gather() -> None:
    from tessera.serve.transfer import take_rows

    x = torch.arange(12.0).view(4, 3)
    assert take_rows(x, range(4)) is x
    assert take_rows(x, [3, 0, 3]).tolist() == [x[3].tolist(), x[0].tolist(), x[3].tolist()]
    assert take_rows(x, [0, 1]).tolist() == x[:2].tolist()
