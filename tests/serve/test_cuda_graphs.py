"""On a GPU: CUDA-graph decode equals eager decode token for token, and target-as-own-draft accepts every
draft token on the graph path."""

from __future__ import annotations

import pytest
import torch

from tessera.specs import SpeculativeConfig

from .conftest import engine, random_model, run
from .test_engine import GREEDY, prompts


@pytest.mark.gpu
def test_graph_decode_equals_eager_and_self_draft_accepts_all() -> None:
    model = random_model(0).to("cuda")
    ps = prompts(6, seed=21)
    eager = run(engine(model, enforce_eager=True), ps, GREEDY)
    graphed_engine = engine(model, cuda_graph_batch_sizes=(1, 2, 4, 8))
    assert graphed_engine.runner.graphs is not None, graphed_engine.runner.graph_error
    graphed = run(graphed_engine, ps, GREEDY)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]
    spec = SpeculativeConfig(method="draft", draft_model="self", num_speculative_tokens=4)
    eng = engine(model, draft_model=model, speculative=spec, cuda_graph_batch_sizes=(1, 2, 4, 8))
    assert eng.proposer.runner.graphs is not None
    outs = run(eng, ps, GREEDY)
    assert all(o.metrics.acceptance_rate == 1.0 for o in outs)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in eager]
    torch.cuda.synchronize()
