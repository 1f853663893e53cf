"""`tessera quantize` end to end: a saved checkpoint in, a quantized checkpoint out that
`load_quantized` reads back with the recorded settings, lineage and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera.cli import main as tessera_main
from tessera.model import Transformer
from tessera.model.checkpoint import save_pretrained
from tessera.model.tokenizer import Tokenizer
from tessera.quant import Int4Linear, load_quantized, read_quant_card
from tessera.quant.cli import main_quantize
from tessera.specs import ModelConfig, QuantConfig

TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}" for i in range(300))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer.train([TEXT], vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=128,
                      max_seq_len=64, tie_embeddings=True)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("float")
    save_pretrained(Transformer(cfg), directory, tokenizer=tok)
    return directory


def test_quantize_awq_with_config_file(model_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    cfg = QuantConfig(method="awq", group_size=32, n_grid=4, clip_grid=8, calib_samples=4, calib_seq_len=32)
    cfg.dump(tmp_path / "q.yaml")
    out = tmp_path / "awq"
    argv = ["--model", str(model_dir), "--method", "awq", "--config", str(tmp_path / "q.yaml"),
            "--calib", str(calib), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main_quantize(argv) == 0
    card = read_quant_card(out)
    assert card.quant == cfg
    assert card.lineage.method == "quantize" and card.lineage.parent == str(model_dir)
    model = load_quantized(out, config=cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert Tokenizer.from_dir(out).encode("the lazy dog") == Tokenizer.from_dir(model_dir).encode("the lazy dog")


def test_tessera_command_dispatches_to_quantize(model_dir: Path, tmp_path: Path) -> None:
    assert tessera_main(["quantize", "--model", str(model_dir), "--method", "int8", "--out", str(tmp_path),
                         "--device", "cpu", "--quiet"]) == 0
    assert read_quant_card(tmp_path).quant == QuantConfig(method="int8")


@pytest.mark.parametrize("argv, message", [
    (["--method", "awq"], "--method awq needs --calib"),
    ([], "give --method or --config"),
])
def test_usage_errors(model_dir: Path, tmp_path: Path, argv: list[str], message: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main_quantize(["--model", str(model_dir), "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_method_and_config_must_agree(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    QuantConfig(method="fp8").dump(tmp_path / "q.json")
    with pytest.raises(SystemExit):
        main_quantize(["--model", str(model_dir), "--out", str(tmp_path / "o"), "--method", "int8",
                       "--config", str(tmp_path / "q.json")])
    assert "--method 'int8' disagrees with method='fp8'" in capsys.readouterr().err


def test_help_describes_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main_quantize(["--help"])
    text = capsys.readouterr().out
    assert "AWQ" in text and "--calib" in text and "FP8" in text
