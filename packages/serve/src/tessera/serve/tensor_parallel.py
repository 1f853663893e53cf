"""Tensor parallelism for inference: every layer split across the ranks of a process group.

Megatron-style: q/k/v and gate/up are column-parallel (each rank owns whole heads and a slice of
the MLP's hidden units), o_proj and down_proj are row-parallel and end in an all-reduce, so each
block costs two all-reduces. The embedding and the LM head are split along the vocabulary; the
LM head all-gathers its logits so every rank sees the full distribution. When there are fewer KV
heads than ranks, each rank keeps the one KV head its query heads read (replication).

A rank's model is an ordinary `Transformer` built from a *local* `ModelConfig` (its share of the
heads, MLP units and vocabulary) whose row-parallel and vocabulary modules are swapped for the
collective-aware ones below, so the serving code drives it exactly like a single-GPU model, and a
paged KV cache per rank holds only that rank's KV heads. Weights are read slice by slice from
safetensors, so no rank ever holds another rank's shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from tessera.model import Transformer
from tessera.specs import ModelConfig


@dataclass(frozen=True)
class TPLayout:
    """Which heads, MLP units and vocabulary rows rank `rank` of `world` owns.

    Needs `n_heads % world == 0` and either `n_kv_heads % world == 0` (KV heads split) or
    `world % n_kv_heads == 0` (each KV head replicated on `world // n_kv_heads` ranks), and
    `d_ff % world == 0`. The vocabulary is padded up to a multiple of `world`.
    """

    cfg: ModelConfig
    rank: int
    world: int

    def __post_init__(self) -> None:
        c, w = self.cfg, self.world
        if not 0 <= self.rank < w:
            raise ValueError(f"rank {self.rank} outside [0, world={w})")
        if c.n_heads % w:
            raise ValueError(f"tensor parallel size {w} must divide n_heads ({c.n_heads})")
        if c.n_kv_heads % w and w % c.n_kv_heads:
            raise ValueError(f"tensor parallel size {w} must divide or be a multiple of n_kv_heads ({c.n_kv_heads})")
        if c.d_ff % w:
            raise ValueError(f"tensor parallel size {w} must divide d_ff ({c.d_ff})")

    @property
    def head_dim(self) -> int:
        return self.cfg.head_dim or self.cfg.d_model // self.cfg.n_heads

    @property
    def q_heads(self) -> range:
        n = self.cfg.n_heads // self.world
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_heads(self) -> range:
        c = self.cfg
        if c.n_kv_heads % self.world == 0:
            n = c.n_kv_heads // self.world
            return range(self.rank * n, (self.rank + 1) * n)
        first = self.q_heads.start // c.n_rep  # every local query head reads this one KV head
        return range(first, first + 1)

    @property
    def ff(self) -> range:
        n = self.cfg.d_ff // self.world
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.cfg.vocab_size // self.world)

    @property
    def vocab(self) -> range:
        n = self.vocab_per_rank
        return range(self.rank * n, min((self.rank + 1) * n, self.cfg.vocab_size))

    def local_config(self) -> ModelConfig:
        """The shape of this rank's `Transformer`: its heads and MLP units. `vocab_size` stays the full
        vocabulary, which is what the model's logits cover (the embedding and head hold a slice)."""
        return self.cfg.model_copy(update={
            "n_heads": len(self.q_heads), "n_kv_heads": len(self.kv_heads), "head_dim": self.head_dim,
            "d_ff": len(self.ff),
        })

    def split(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's slice of parameter `name`; None when replicated."""
        d = self.head_dim
        leaf = name.rsplit(".", 2)[-2:]
        module, kind = leaf[0], leaf[1]
        if module == "q_proj":
            return (0, self.q_heads.start * d, self.q_heads.stop * d)
        if module in ("k_proj", "v_proj"):
            return (0, self.kv_heads.start * d, self.kv_heads.stop * d)
        if module == "o_proj" and kind == "weight":
            return (1, self.q_heads.start * d, self.q_heads.stop * d)
        if module in ("gate_proj", "up_proj"):
            return (0, self.ff.start, self.ff.stop)
        if module == "down_proj":
            return (1, self.ff.start, self.ff.stop)
        if module in ("embed_tokens", "lm_head"):
            return (0, self.vocab.start, self.vocab.stop)
        return None


class RowParallelLinear(nn.Linear):
    """A linear over this rank's slice of the input features; the partial outputs are summed
    across the group (the block's all-reduce)."""

    def __init__(self, in_features: int, out_features: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelEmbedding(nn.Embedding):
    """Rows `[start, start + num_embeddings)` of the embedding; ids owned by other ranks contribute
    zeros, and an all-reduce assembles every token's vector."""

    def __init__(self, num_embeddings: int, dim: int, start: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(num_embeddings, dim)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        dist.all_reduce(out, group=self.group)
        return out


class VocabParallelLMHead(nn.Linear):
    """Logits for this rank's vocabulary rows, all-gathered into the full `[..., vocab_size]`."""

    def __init__(self, dim: int, rows: int, vocab_size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(dim, rows, bias=False)
        self.vocab_size, self.group = vocab_size, group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


SliceReader = Callable[[str, tuple[int, int, int] | None], torch.Tensor]


def build_tp_model(cfg: ModelConfig, read: SliceReader, *, group: dist.ProcessGroup | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """This rank's shard of `cfg` in eval mode, its parameters filled by `read(name, split)`, which
    returns the whole tensor `name` (split None) or its slice `split = (dim, start, stop)`.

    The returned model's `config` is the local shape (`TPLayout.local_config`); its logits cover the
    full vocabulary.
    """
    layout = TPLayout(cfg, dist.get_rank(group), dist.get_world_size(group))
    local = layout.local_config()
    with torch.device("meta"):
        model = Transformer(local)
        rows = layout.vocab_per_rank
        model.model.embed_tokens = VocabParallelEmbedding(rows, cfg.d_model, layout.vocab.start, group)
        model.lm_head = VocabParallelLMHead(cfg.d_model, rows, cfg.vocab_size, group)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj = RowParallelLinear(attn.o_proj.in_features, cfg.d_model, group)
            mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features, cfg.d_model, group)
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())
    for name, param in params.items():
        source = "model.embed_tokens.weight" if name == "lm_head.weight" and cfg.tie_embeddings else name
        split = layout.split(source)
        tensor = read(source, split)
        with torch.no_grad():
            param.zero_()  # padded vocabulary rows stay zero
            param[: tensor.shape[0]].copy_(tensor)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


class SafetensorsSlices:
    """Reads tensors, or slices of them, straight from a directory's safetensors files (tessera or
    HF: both name tensors alike), so a rank touches only the bytes of its shard."""

    def __init__(self, directory: str | Path) -> None:
        from tessera.model.hf import weight_files

        self.directory = Path(directory)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        for path in weight_files(self.directory):
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            for key in handle.keys():
                self._where[key] = handle

    def __call__(self, name: str, split: tuple[int, int, int] | None) -> torch.Tensor:
        handle = self._where.get(name)
        if handle is None:
            raise KeyError(f"{self.directory}: no tensor {name!r} in its safetensors files")
        if split is None:
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        dim, start, stop = split
        view = handle.get_slice(name)  # type: ignore[attr-defined]
        return view[start:stop] if dim == 0 else view[:, start:stop]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsSlices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config(directory: str | Path) -> ModelConfig:
    """The `ModelConfig` of a tessera checkpoint (modelcard.json) or an HF directory (config.json)."""
    directory = Path(directory)
    if (directory / "modelcard.json").is_file():
        from tessera.model.checkpoint import read_model_card

        return read_model_card(directory).config
    if (directory / "config.json").is_file():
        from tessera.model.hf import config_from_hf

        return config_from_hf(json.loads((directory / "config.json").read_text()))
    raise FileNotFoundError(f"{directory} has neither modelcard.json nor config.json")


def load_tp_model(directory: str | Path, *, group: dist.ProcessGroup | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """This rank's shard of the model in `directory`, read slice by slice."""
    cfg = read_config(directory)
    with SafetensorsSlices(directory) as reader:
        return build_tp_model(cfg, reader, group=group, device=device, dtype=dtype)


def iter_parallel_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The collective-aware modules of a tensor-parallel model (two all-reduces per block)."""
    for module in model.modules():
        if isinstance(module, RowParallelLinear | VocabParallelEmbedding | VocabParallelLMHead):
            yield module
