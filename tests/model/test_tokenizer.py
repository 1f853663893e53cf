"""Tokenizer: encodes as the `tokenizers` library and `transformers` do, round-trips real text, and
renders chat templates as `transformers` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tessera.model.tokenizer import CHATML_TEMPLATE, ChatTemplateError, Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? Answer <b>only</b> with a number & a newline.\n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And \u00e9t\u00e9 \u2014 \U0001f600?"},
]


def _corpus(shared: Path, name: str) -> str:
    return (shared / name).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(shared_data: Path) -> Tokenizer:
    # The data README's training convention: tinyshakespeare + wikitext-2 valid (test is held out).
    text = _corpus(shared_data, "tinyshakespeare/input.txt") + _corpus(shared_data, "wikitext-2/valid.txt")
    return Tokenizer.train(text.splitlines(keepends=True), vocab_size=2048)


@pytest.fixture(scope="module")
def saved_dir(trained: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained.save_dir(tmp_path_factory.mktemp("tok"))


def test_trained_tokenizer_has_the_contract_special_tokens(trained: Tokenizer) -> None:
    assert trained.vocab_size == 2048
    assert trained.eos_token == "<|endoftext|>" and trained.eos_token_id is not None
    assert trained.pad_token_id == trained.eos_token_id
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = trained.encode(f"a{token}b")
        assert trained.token_to_id(token) in ids, token
        assert token not in trained.decode(ids)  # special tokens are skipped by default
        assert token in trained.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["tinyshakespeare/input.txt", "wikitext-2/test.txt"])
def test_encodes_as_tokenizers_and_transformers_and_round_trips(
        trained: Tokenizer, saved_dir: Path, shared_data: Path, name: str) -> None:
    text = _corpus(shared_data, name)
    ours = Tokenizer.from_dir(saved_dir)
    reference = tokenizers.Tokenizer.from_file(str(saved_dir / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(saved_dir / "tokenizer.json"))
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert ids == trained.encode(text)
    lines = text.splitlines(keepends=True)[:1000]
    assert ours.encode_batch(lines) == [hf.encode(line, add_special_tokens=False) for line in lines]
    assert ours.decode(ids) == text  # byte-level BPE is lossless on any text, `<unk>` markers included
    assert len(ids) < len(text.encode()) / 2  # the merges compress real text


def test_non_ascii_and_control_text_round_trips(trained: Tokenizer) -> None:
    text = "caf\u00e9 \u4e2d\u6587 \U0001f600\t\x00\r\n  spaced   out \u200b"
    assert trained.decode(trained.encode(text)) == text


def test_foreign_tokenizer_json_with_a_bos_post_processor(tmp_path: Path) -> None:
    """A tokenizer.json built directly with `tokenizers` (BOS added by a template post-processor):
    ours encodes it exactly as `tokenizers` does, with and without special tokens, and infers BOS/EOS."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + ["pack my box"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ours = Tokenizer.from_file(path)
    text = "the lazy fox packs a box"
    for special in (False, True):
        assert ours.encode(text, add_special_tokens=special) == tok.encode(text, add_special_tokens=special).ids
    assert ours.encode(text, add_special_tokens=True)[0] == ours.bos_token_id == 0
    assert ours.eos_token == "</s>" and ours.pad_token is None


def test_default_chat_template_matches_transformers(trained: Tokenizer, saved_dir: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(saved_dir)
    for gen in (True, False):
        ours = trained.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    rendered = trained.apply_chat_template(MESSAGES[:2])
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = trained.encode(rendered)
    assert ids.count(trained.token_to_id("<|im_start|>")) == 3
    assert hf.encode(rendered, add_special_tokens=False) == ids


LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    "{{ messages | map(attribute='role') | list | tojson }}"
)


def test_chat_template_from_tokenizer_config_matches_transformers(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "tokenizer.json")
    bos = {"__type": "AddedToken", "content": "<|im_start|>", "special": True}
    config = {"bos_token": bos, "eos_token": "<|im_end|>",
              "chat_template": LLAMA3_STYLE, "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(tmp_path)
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False,
                                                                        add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_runs_sandboxed_and_validates_messages(trained: Tokenizer) -> None:
    evil = Tokenizer(trained.backend, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        evil.apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        trained.apply_chat_template([{"role": "user", "content": "hi"}, {"content": "no role"}])
    assert trained.chat_template == CHATML_TEMPLATE


def test_roles_survive_a_modelcard_round_trip(trained: Tokenizer, tmp_path: Path) -> None:
    custom = Tokenizer(trained.backend, eos_token="<|im_end|>", chat_template="{{ messages[0]['content'] }}")
    custom.save(tmp_path / "tokenizer.json")
    (tmp_path / "modelcard.json").write_text(json.dumps({"tokenizer": custom.info().model_dump()}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.eos_token_id == custom.eos_token_id == trained.token_to_id("<|im_end|>")
    assert loaded.apply_chat_template([{"role": "user", "content": "only this"}]) == "only this"


def test_errors_name_the_value(trained: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match=r"token id 2048 is outside"):
        trained.decode([1, 2048])
    with pytest.raises(ValueError, match="eos_token '<nope>'"):
        Tokenizer(trained.backend, eos_token="<nope>")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
