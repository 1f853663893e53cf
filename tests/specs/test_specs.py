"""Every spec round-trips through JSON and YAML; invalid values fail naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tessera.specs import (
    DistillConfig,
    EngineConfig,
    GenerateRequest,
    KVCacheHandle,
    KVCacheSpec,
    ModelCard,
    ModelConfig,
    QuantConfig,
    RequestOutput,
    SamplingParams,
    SpeculativeConfig,
    TensorSpec,
)
from tessera.specs.schemas import SPECS

pos = st.integers(1, 4096)


@st.composite
def model_configs(draw: st.DrawFn) -> ModelConfig:
    n_kv = draw(st.integers(1, 8))
    n_heads = n_kv * draw(st.integers(1, 4))
    head_dim = 2 * draw(st.integers(1, 64))
    return ModelConfig(
        vocab_size=draw(pos), d_model=draw(pos), n_layers=draw(st.integers(1, 64)), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, d_ff=draw(pos),
        rope_theta=draw(st.floats(1.0, 1e7)), norm_eps=draw(st.floats(1e-8, 1e-3)),
        tie_embeddings=draw(st.booleans()), qk_norm=draw(st.booleans()), attention_bias=draw(st.booleans()),
        rope_scaling=draw(st.none() | st.just({"type": "llama3", "factor": 8.0})),
    )


sampling = st.builds(
    SamplingParams,
    temperature=st.floats(0, 5), top_p=st.floats(0.01, 1.0), top_k=st.sampled_from([-1, 1, 50]),
    min_p=st.floats(0, 1), seed=st.none() | st.integers(0, 2**31), max_tokens=st.integers(1, 4096),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=3).map(tuple),
    stop_token_ids=st.lists(st.integers(0, 1000), max_size=3).map(tuple),
    logprobs=st.none() | st.integers(0, 20), presence_penalty=st.floats(-2, 2),
)

quant = st.one_of(
    st.builds(QuantConfig, method=st.just("int8")),
    st.builds(QuantConfig, method=st.just("awq"), group_size=st.sampled_from([32, 64, 128])),
    st.builds(QuantConfig, method=st.just("fp8"), weight_scale=st.sampled_from(["per_tensor", "per_row"])),
    st.builds(QuantConfig, method=st.just("int4_rtn"), group_size=st.sampled_from([32, 64, 128])),
)


def _any_spec() -> st.SearchStrategy:
    sha = st.text("0123456789abcdef", min_size=64, max_size=64)
    return st.one_of(
        model_configs(),
        sampling,
        quant,
        st.builds(EngineConfig, max_num_seqs=pos, block_size=st.sampled_from([8, 16, 32]),
                  speculative=st.none() | st.builds(SpeculativeConfig, method=st.just("ngram"))),
        st.builds(KVCacheSpec, n_layers=pos, n_kv_heads=pos, head_dim=pos, num_blocks=pos),
        st.builds(TensorSpec, name=st.text(max_size=8),
                  dims=st.lists(st.integers(0, 9) | st.sampled_from(["B", "T", "H"]), max_size=4).map(tuple)),
        st.builds(GenerateRequest, request_id=st.text(max_size=8), prompt=st.text(max_size=20), sampling=sampling),
        st.builds(DistillConfig, steps=pos, student=st.sampled_from(["student-6m", "tiny-student"]),
                  teacher=st.just("runs/teacher")),
        st.builds(ModelCard, config=model_configs(), quant=st.none() | quant,
                  weights=st.dictionaries(st.sampled_from(["model.safetensors", "model-00001.safetensors"]), sha,
                                          min_size=1)),
    )


@settings(max_examples=150, deadline=None)
@given(_any_spec())
def test_round_trip_json_and_yaml(spec) -> None:
    cls = QuantConfig if isinstance(spec, QuantConfig) else type(spec)
    assert cls.from_json(spec.to_json()) == spec
    assert cls.from_yaml(spec.to_yaml()) == spec


def test_round_trip_through_files(tmp_path) -> None:
    cfg = ModelConfig.preset("llama-3.2-1b")
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"cfg{suffix}"
        cfg.dump(path)
        assert ModelConfig.load(path) == cfg
        assert ModelConfig.load(str(path)) == cfg


def _error_fields(exc: ValidationError) -> str:
    return " ".join(".".join(map(str, e["loc"])) + " " + e["msg"] for e in exc.errors())


BASE = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ModelConfig, {**BASE, "n_kv_heads": 3}, "n_kv_heads"),
        (ModelConfig, {**BASE, "d_model": 0}, "d_model"),
        (ModelConfig, {**BASE, "n_layers": -1}, "n_layers"),
        (ModelConfig, {**BASE, "vocab_size": 0}, "vocab_size"),
        (ModelConfig, {**BASE, "flavour": 1}, "flavour"),
        (SamplingParams, {"temperature": -0.1}, "temperature"),
        (SamplingParams, {"top_p": 0.0}, "top_p"),
        (SamplingParams, {"top_p": 1.5}, "top_p"),
        (SamplingParams, {"max_tokens": 0}, "max_tokens"),
        (SamplingParams, {"top_k": 0}, "top_k"),
        (SamplingParams, {"bogus": True}, "bogus"),
        (EngineConfig, {"block_size": 0}, "block_size"),
        (KVCacheSpec, {"n_layers": 1, "n_kv_heads": 1, "head_dim": 0, "num_blocks": 1}, "head_dim"),
    ],
)
def test_invalid_values_name_the_field(cls, kwargs, field) -> None:
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    assert field in _error_fields(info.value)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(1, 16))
def test_head_ratio_property(n_heads, n_kv) -> None:
    if n_heads % n_kv:
        with pytest.raises(ValidationError, match="n_kv_heads"):
            ModelConfig(**{**BASE, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": 16})
    else:
        assert ModelConfig(**{**BASE, "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": 16}).n_rep == n_heads // n_kv


def test_quant_union_dispatches_and_rejects_unknown_method() -> None:
    awq = QuantConfig(method="awq", group_size=64)
    assert type(awq).__name__ == "AWQConfig" and awq.group_size == 64
    assert QuantConfig.load({"method": "fp8"}).method == "fp8"
    with pytest.raises(ValueError, match="method"):
        QuantConfig(method="int3")
    with pytest.raises(ValidationError, match="group_size"):
        QuantConfig(method="awq", group_size=100)


def test_presets_and_param_counts() -> None:
    assert 5e6 < ModelConfig.preset("student-6m").num_params() < 7e6
    assert 35e6 < ModelConfig.preset("teacher-40m").num_params() < 45e6
    assert 1.1e9 < ModelConfig.preset("llama-3.2-1b").num_params() < 1.3e9
    assert 0.55e9 < ModelConfig.preset("qwen3-0.6b").num_params() < 0.65e9
    with pytest.raises(KeyError, match="nope"):
        ModelConfig.preset("nope")


@pytest.mark.parametrize("name", ["student-6m", "draft-2l", "draft-3l"])
def test_draft_presets_fit_the_quality_teacher(name: str) -> None:
    # A draft must share its target's vocabulary and cover its context, and the drafts are the
    # shallow ones: fewer layers than student-6m (depth sets a launch-bound forward's cost).
    teacher, draft = ModelConfig.preset("teacher-40m"), ModelConfig.preset(name)
    assert draft.vocab_size == teacher.vocab_size and draft.max_seq_len >= teacher.max_seq_len
    if name.startswith("draft-"):
        assert draft.n_layers < ModelConfig.preset("student-6m").n_layers
        assert draft.num_params() < teacher.num_params() / 3


def test_handle_capacity_and_slots() -> None:
    h = KVCacheHandle(seq_id=1, block_ids=(4, 7), num_tokens=20, block_size=16)
    assert h.slot(0) == 64 and h.slot(17) == 7 * 16 + 1
    with pytest.raises(ValidationError, match="capacity"):
        KVCacheHandle(seq_id=1, block_ids=(4,), num_tokens=17, block_size=16)


def test_request_output_and_generate_request() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        GenerateRequest(request_id="a")
    out = RequestOutput(request_id="a", prompt_token_ids=(1, 2), finished=True,
                        outputs=({"text": "x", "token_ids": (3,), "finish_reason": "length"},))
    assert RequestOutput.from_json(out.to_json()) == out


def test_every_top_level_spec_has_a_version() -> None:
    for spec in SPECS:
        assert spec.SCHEMA_VERSION >= 1
        assert "schema_version" in spec.model_fields or spec is QuantConfig
