"""`Tokenizer`: a byte-level BPE over the `tokenizers` library, with special tokens and chat templates.

The encoding itself is the `tokenizers` library's (a `tokenizer.json` encodes here exactly as it does
there); this class adds what a model directory needs beside it: which ids are BOS/EOS/PAD, and the chat
template from `tokenizer_config.json` (rendered in a sandboxed Jinja environment, as `transformers`
does), with ChatML as the default.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from tessera.specs.model_card import TokenizerInfo

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML, as Qwen and many others ship it: one `<|im_start|>role\ncontent<|im_end|>\n` block per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Names that published tokenizers use for their special tokens, most specific first; used only when no
# tokenizer_config.json says which token plays which role.
_EOS_NAMES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


class ChatTemplateError(ValueError):
    """A chat template failed to render (a bad template, or `raise_exception` called by the template)."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special-token roles and a chat template.

    Construct with `train`, `from_file` or `from_dir`; ids are Python ints in `[0, vocab_size)`.
    """

    def __init__(self, tokenizer: _HFTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None) -> None:
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        for role, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token is not None and token not in vocab:
                raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary")
        self.bos_token = bos_token if bos_token is not None else _first_present(_BOS_NAMES, vocab)
        self.eos_token = eos_token if eos_token is not None else _first_present(_EOS_NAMES, vocab)
        self.pad_token = pad_token if pad_token is not None else _first_present(_PAD_NAMES, vocab)
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE

    # ---------------------------------------------------------------- construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              special_tokens: Sequence[str] = SPECIAL_TOKENS, show_progress: bool = True) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style pre-tokenization, all 256 bytes in the base alphabet, so
        every string encodes and decodes losslessly) on `texts`.

        `vocab_size` counts the bytes, the merges and `special_tokens` (which default to `<|endoftext|>`,
        the EOS and PAD token, and the ChatML markers). Raises ValueError if it cannot hold the byte
        alphabet plus the special tokens.
        """
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        floor = len(alphabet) + len(special_tokens)
        if vocab_size < floor:
            raise ValueError(f"vocab_size={vocab_size} is below the {floor} needed for 256 bytes + "
                             f"{len(special_tokens)} special tokens")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
            initial_alphabet=alphabet,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        )
        tok.train_from_iterator(texts, trainer=trainer)
        eos = ENDOFTEXT if ENDOFTEXT in special_tokens else None
        return cls(tok, eos_token=eos, pad_token=eos)

    @classmethod
    def from_file(cls, path: str | Path, **roles: str | None) -> Tokenizer:
        """Load a `tokenizer.json`. Keyword arguments (`bos_token`, `eos_token`, `pad_token`,
        `chat_template`) override what is inferred from well-known special-token names."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(_HFTokenizer.from_file(str(path)), **roles)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` from a model directory, with roles and chat template taken from
        `tokenizer_config.json` when present, else from a tessera `modelcard.json`'s tokenizer block.
        Raises FileNotFoundError when the directory has no `tokenizer.json`."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        backend = _HFTokenizer.from_file(str(path))
        roles: dict[str, Any] = {}
        config_path, card_path = directory / "tokenizer_config.json", directory / "modelcard.json"
        if config_path.is_file():
            roles = _roles_from_tokenizer_config(json.loads(config_path.read_text()))
        elif card_path.is_file():
            roles = _roles_from_card(json.loads(card_path.read_text()), backend)
        return cls(backend, **roles)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` to `path` (a file path); returns it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path

    def save_dir(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and a `tokenizer_config.json` (roles + chat template) that
        `transformers.AutoTokenizer.from_pretrained` reads; returns the directory."""
        directory = Path(directory)
        self.save(directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config(), indent=2) + "\n")
        return directory

    def tokenizer_config(self) -> dict[str, Any]:
        """The `tokenizer_config.json` content describing this tokenizer's roles and chat template."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
        }

    def info(self, file: str = "tokenizer.json") -> TokenizerInfo:
        """The `TokenizerInfo` block a tessera `modelcard.json` records for this tokenizer."""
        return TokenizerInfo(file=file, vocab_size=self.vocab_size, bos_token_id=self.bos_token_id,
                             eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                             chat_template=self.chat_template)

    # ---------------------------------------------------------------- encode / decode

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`. Special tokens written in the text (e.g. `<|im_end|>`) map to their ids;
        `add_special_tokens` applies the tokenizer's post-processor (e.g. a BOS prefix) if it has one."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel inside the `tokenizers` library."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; raises ValueError naming an id outside `[0, vocab_size)`."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside [0, vocab_size={self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` (dicts with at least `role`) with this tokenizer's chat template.

        The template runs in Jinja's immutable sandbox with the variables `transformers` provides
        (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`, `raise_exception`,
        `strftime_now`) plus `extra`. Raises ValueError naming a malformed message, and
        ChatTemplateError when the template fails.
        """
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
        try:
            template = _compile(self.chat_template)
            return template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "",
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r})")


def _first_present(names: Sequence[str], vocab: Mapping[str, int]) -> str | None:
    return next((n for n in names if n in vocab), None)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a role either as a string or as an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _roles_from_tokenizer_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    roles = {k: _token_content(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the "default" one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    roles["chat_template"] = template
    return {k: v for k, v in roles.items() if v is not None}


def _roles_from_card(card: Mapping[str, Any], backend: _HFTokenizer) -> dict[str, Any]:
    """A tessera card records roles as ids (`TokenizerInfo`); map them back to token strings."""
    info = card.get("tokenizer") or {}
    roles = {role: backend.id_to_token(info[f"{role}_id"]) for role in ("bos_token", "eos_token", "pad_token")
             if info.get(f"{role}_id") is not None}
    if info.get("chat_template"):
        roles["chat_template"] = info["chat_template"]
    return roles


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Jinja's own `tojson` HTML-escapes; chat templates expect plain JSON, as `transformers` renders it.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
