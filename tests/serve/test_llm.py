"""`LLM` over model directories (tessera, HF, quantized) and the `tessera generate` / `tessera bench` CLIs."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.model.checkpoint import save_pretrained
from tessera.serve import LLM, RequestRejected
from tessera.serve.cli import main_bench, main_generate
from tessera.specs import SamplingParams

from .conftest import engine, random_model, run, tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    save_pretrained(random_model(4, tiny_config(vocab=tokenizer.vocab_size, init_std=0.5)), path, tokenizer=tokenizer)
    return path


def test_llm_generates_in_prompt_order_like_the_engine(ckpt, tokenizer) -> None:
    llm = LLM(ckpt, num_blocks=64, block_size=4)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["the quick brown fox", "lazy", "seven wizards hum softly and every"]
    outs = llm.generate(prompts, sp)
    assert [o.prompt for o in outs] == prompts
    ids = [tokenizer.encode(p) for p in prompts]
    assert [o.prompt_token_ids for o in outs] == [tuple(i) for i in ids]
    want = run(engine(llm.engine.runner.model, tokenizer), ids, sp)
    assert [o.outputs[0].token_ids for o in outs] == [w.outputs[0].token_ids for w in want]
    again = llm.generate(ids[0], sp)  # token ids, a second call on the same LLM
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    with pytest.raises(RequestRejected):
        llm.generate(["ok", "x" * 2000], sp)
    assert not llm.engine.has_unfinished()


def test_llm_loads_hf_directories(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=128, initializer_range=0.5)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    prompt = [5, 9, 2, 7, 1]
    out = LLM(tmp_path, num_blocks=32, block_size=4).generate([prompt], SamplingParams(temperature=0, max_tokens=8,
                                                                                       ignore_eos=True))
    ids = torch.tensor([prompt])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert list(out[0].outputs[0].token_ids) == want


def test_llm_quantizes_at_load_and_reads_quantized_checkpoints(ckpt, tmp_path) -> None:
    from tessera.quant import save_quantized

    llm = LLM(ckpt, quant="int8", num_blocks=32, block_size=4)
    assert any("Int8" in type(m).__name__ for m in llm.engine.runner.model.modules())
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first = llm.generate(["the quick"], sp)[0].outputs[0]
    save_quantized(llm.engine.runner.model, tmp_path / "q", tokenizer=llm.tokenizer)
    reloaded = LLM(tmp_path / "q", num_blocks=32, block_size=4).generate(["the quick"], sp)[0].outputs[0]
    assert reloaded.token_ids == first.token_ids and len(first.token_ids) == 5


def test_generate_cli(ckpt, capsys) -> None:
    assert main_generate(["--model", str(ckpt), "--prompt", "the quick", "--prompt", "lazy", "--max-tokens", "4",
                          "--num-blocks", "32", "--json", "--ngram"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["the quick", "lazy"]
    assert all(len(x["outputs"][0]["token_ids"]) <= 4 for x in lines)


def test_generate_cli_takes_an_engine_config_file(ckpt, tmp_path, capsys) -> None:
    from tessera.specs import EngineConfig

    path = tmp_path / "engine.yaml"
    EngineConfig(num_blocks=32, block_size=4, device="cpu").dump(path)
    assert main_generate(["--model", str(ckpt), "--prompt", "lazy", "--max-tokens", "3", "--config", str(path),
                          "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["outputs"][0]["token_ids"]) <= 3
    (tmp_path / "bad.yaml").write_text("block_size: -4\n")
    with pytest.raises(SystemExit) as exc:  # a usage error naming the field, before anything loads
        main_generate(["--model", str(ckpt), "--prompt", "x", "--config", str(tmp_path / "bad.yaml")])
    assert exc.value.code == 2 and "block_size" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--draft", "d", "--ngram"], "not allowed with argument"),
    (["--ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
])
def test_generate_cli_refuses_bad_speculative_flags(flags, expected, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main_generate(["--model", "/nonexistent", "--prompt", "x", *flags])
    assert exc.value.code == 2 and expected in capsys.readouterr().err


def test_bench_cli(ckpt, tmp_path) -> None:
    out = tmp_path / "bench.json"
    assert main_bench(["--model", str(ckpt), "--num-requests", "4", "--input-len", "4", "12", "--output-len", "2",
                       "6", "--rate", "50", "--num-blocks", "64", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["offline"]["requests"] == 4 and result["offline"]["output_tokens"] >= 8
    assert result["online_50"]["ttft_ms_p50"] > 0
