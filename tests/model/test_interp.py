"""Interpretability tools: hooks, logit lens, attention patterns (against transformers' eager attention),
and induction heads appearing in a small model trained on repeated random sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from tessera.model.hf import export_hf
from tessera.model.interp import (
    attention_patterns,
    capture,
    induction_score_from_probs,
    induction_scores,
    logit_lens,
    repeated_random_tokens,
)
from tessera.model.transformer import Transformer
from tessera.specs import ModelConfig

CFG = ModelConfig(vocab_size=61, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=64, qk_norm=True,
                  attention_bias=True, init_std=0.1)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_capture_records_named_outputs_and_removes_its_hooks(model: Transformer) -> None:
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    with capture(model, ["model.norm", "model.layers.1", "model.layers.0.self_attn.q_proj"]) as acts:
        logits = model(ids)
    h, blocks = model.hidden_states(ids, collect=[1])
    torch.testing.assert_close(acts["model.norm"], h, atol=0, rtol=0)
    torch.testing.assert_close(acts["model.layers.1"], blocks[1], atol=0, rtol=0)
    assert acts["model.layers.0.self_attn.q_proj"].shape == (2, 9, CFG.n_heads * CFG.head_dim)
    torch.testing.assert_close(model.lm_head(acts["model.norm"]), logits, atol=0, rtol=0)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(KeyError, match=r"model\.layers\.7"), capture(model, ["model.layers.7"]):
        pass


def test_logit_lens_ends_at_the_model_output(model: Transformer) -> None:
    ids = torch.randint(0, CFG.vocab_size, (2, 11))
    lens = logit_lens(model, ids)
    assert lens.shape == (CFG.n_layers, 2, 11, CFG.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], model(ids).log_softmax(-1), atol=1e-5, rtol=0)
        with capture(model, ["model.layers.0"]) as acts:
            model(ids)
        first = model.lm_head(model.model.norm(acts["model.layers.0"])).log_softmax(-1)
    torch.testing.assert_close(lens[0], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.exp().sum(-1), torch.ones(CFG.n_layers, 2, 11))


def test_attention_patterns_match_transformers_eager_attention(model: Transformer, tmp_path: Path) -> None:
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 13))
    logits, probs = attention_patterns(model, ids)
    with torch.no_grad():
        out = hf(ids, output_attentions=True)
        plain = model(ids)
    torch.testing.assert_close(logits, plain, atol=0, rtol=0)  # capturing q/k leaves the forward unchanged
    torch.testing.assert_close(probs, torch.stack(out.attentions), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(CFG.n_layers, 2, CFG.n_heads, 13))
    assert torch.all(probs.triu(1) == 0)


def test_induction_score_picks_the_right_stripe() -> None:
    seq_len, t = 5, 10
    ideal = torch.zeros(1, 1, t, t)
    for q in range(t):
        ideal[0, 0, q, q - seq_len + 1 if q >= seq_len else 0] = 1.0
    previous = torch.zeros(1, 1, t, t)
    for q in range(t):
        previous[0, 0, q, max(q - 1, 0)] = 1.0
    scores = induction_score_from_probs(torch.cat([ideal, previous], dim=1), seq_len)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0]))
    ids = repeated_random_tokens(3, 7, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids[:, :7], ids[:, 7:]) and all(len(set(r[:7].tolist())) == 7 for r in ids)


def test_induction_heads_form_when_training_on_repeated_sequences() -> None:
    """A 2-layer model trained to continue repeated random sequences grows heads that attend to the token
    after the previous occurrence of the current token. They can only appear in layer 1: the mechanism
    needs a layer-0 head to first copy each position's previous token into its residual stream."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matmuls are tiny: thread hand-offs would cost more than the math
    try:
        _train_and_score()
    finally:
        torch.set_num_threads(threads)


def _train_and_score() -> None:
    torch.manual_seed(0)
    seq_len = 12
    cfg = ModelConfig(vocab_size=48, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=32, max_seq_len=64)
    model = Transformer(cfg)
    probe = torch.Generator().manual_seed(1)
    at_init = induction_scores(model, seq_len=seq_len, generator=probe)
    data = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        ids = repeated_random_tokens(16, seq_len, cfg.vocab_size, generator=data)
        logits = model(ids[:, :-1])
        # Only the second half is predictable; the first half is uniform noise.
        loss = F.cross_entropy(logits[:, seq_len:].flatten(0, 1), ids[:, seq_len + 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = induction_scores(model.eval(), seq_len=seq_len, generator=probe)
    assert loss.item() < 0.1
    assert at_init.max() < 0.15  # ~ uniform attention over the causal prefix
    assert trained[1].max() > 0.9
    assert trained[0].max() < 0.15
