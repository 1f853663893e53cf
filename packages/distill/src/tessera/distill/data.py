"""Text files (or the built-in corpus) -> tokens -> packed windows, served in a deterministic, resumable order.

Documents are tokenized once, joined with the EOS token between them and cut into non-overlapping
windows of `seq_len + 1` tokens (inputs and next-token labels; attention is not masked at document
boundaries). Every epoch visits the windows in a permutation drawn from `seed` and the epoch number. The
loader's whole state is the number of windows consumed globally, so a resumed run (at any world size)
continues with exactly the windows an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tessera.distill.comm import Group, barrier
from tessera.distill.corpus import builtin_corpus
from tessera.model.tokenizer import Tokenizer


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """The files' contents, one document per file (the built-in corpus when `paths` is empty).
    Raises FileNotFoundError naming a missing file."""
    if not paths:
        return builtin_corpus()
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"data path {str(p)!r} is not a file")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def obtain_tokenizer(texts: Sequence[str], vocab_size: int, path: str | Path | None, out_dir: Path,
                     group: Group) -> Tokenizer:
    """The tokenizer at `path`, or one trained on `texts` (by rank 0, saved to `out_dir/tokenizer.json`,
    then loaded by every rank so all agree)."""
    if path is not None:
        return Tokenizer.from_file(path)
    target = out_dir / "tokenizer.json"
    if group.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        Tokenizer.train(texts, vocab_size).save(target)
    barrier(group)
    return Tokenizer.from_file(target)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All documents' tokens, EOS after each, as one int64 vector. Raises ValueError when the tokenizer
    has no EOS token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for doc in tokenizer.encode_batch(list(texts)):
        ids.extend(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


class PackedLoader:
    """Windows of `seq_len + 1` tokens from `tokens`, in per-epoch shuffled order.

    A step's global batch is `world * accum * batch_size` windows; rank `r` takes micro-batch `m` from
    positions `(m * world + r) * batch_size` onward. Raises ValueError when the tokens do not fill one
    window.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, accum: int, group: Group,
                 seed: int = 0) -> None:
        self.tokens, self.seq_len, self.batch_size, self.accum, self.group = tokens, seq_len, batch_size, accum, group
        self.seed = seed
        self.num_windows = (tokens.numel() - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{tokens.numel()} tokens do not fill one window of seq_len + 1 = {seq_len + 1}")
        self.consumed = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    @property
    def tokens_per_step(self) -> int:
        return self.group.world * self.accum * self.batch_size * self.seq_len

    def _window(self, index: int) -> torch.Tensor:
        epoch, j = divmod(index, self.num_windows)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_windows, generator=g), epoch
        start = int(self._perm[j]) * self.seq_len
        return self.tokens[start:start + self.seq_len + 1]

    def next_step(self) -> list[torch.Tensor]:
        """This rank's `accum` micro-batches for the next step, each `[batch_size, seq_len + 1]` int64."""
        micro = []
        for m in range(self.accum):
            first = self.consumed + (m * self.group.world + self.group.rank) * self.batch_size
            micro.append(torch.stack([self._window(first + i) for i in range(self.batch_size)]))
        self.consumed += self.group.world * self.accum * self.batch_size
        return micro

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after `state["consumed"]` windows. Raises ValueError when the windows differ (seq_len)."""
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"loader state is for seq_len {state['seq_len']}, this loader has {self.seq_len}")
        self.consumed, self.seed = int(state["consumed"]), int(state["seed"])
