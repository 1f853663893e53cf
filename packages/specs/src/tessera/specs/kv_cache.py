"""The KV-cache contract: its geometry (`KVCacheSpec`), a per-sequence handle, and the cache API.

The block manager in tessera-serve implements `KVCacheManager` (bookkeeping); paged storage in
tessera-attn holds the tensors that `KVCacheSpec` describes. A handle is an immutable value: every
operation returns a new one.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol, runtime_checkable

from pydantic import NonNegativeInt, PositiveInt, model_validator

from tessera.specs.base import Spec

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1}


class KVCacheSpec(Spec):
    """Geometry of a paged KV cache: `num_blocks` blocks of `block_size` token slots per layer.

    Layout "NHD": each of k and v is `[num_blocks, block_size, n_kv_heads, head_dim]` per layer.
    """

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    n_layers: PositiveInt
    n_kv_heads: PositiveInt
    head_dim: PositiveInt
    block_size: PositiveInt = 16
    num_blocks: PositiveInt
    dtype: Literal["float32", "bfloat16", "float16", "float8_e4m3fn", "int8"] = "bfloat16"
    layout: Literal["NHD"] = "NHD"

    @property
    def bytes_per_block(self) -> int:
        """Bytes of k and v, all layers, for one block."""
        return 2 * self.n_layers * self.block_size * self.n_kv_heads * self.head_dim * _DTYPE_BYTES[self.dtype]

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    @property
    def num_slots(self) -> int:
        return self.block_size * self.num_blocks


class KVCacheHandle(Spec):
    """Opaque, immutable view of one sequence's cache: its blocks, in order, and how many tokens
    they hold. Slot of token `i`: `block_ids[i // block_size] * block_size + i % block_size`."""

    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: Literal[1] = 1
    seq_id: int
    block_ids: tuple[NonNegativeInt, ...]
    num_tokens: NonNegativeInt
    block_size: PositiveInt

    @model_validator(mode="after")
    def _fits(self) -> KVCacheHandle:
        if self.num_tokens > len(self.block_ids) * self.block_size:
            raise ValueError(
                f"num_tokens ({self.num_tokens}) exceeds the capacity of {len(self.block_ids)} blocks "
                f"of {self.block_size}"
            )
        return self

    def slot(self, position: int) -> int:
        if not 0 <= position < self.num_tokens:
            raise IndexError(f"position {position} outside [0, {self.num_tokens}) of seq {self.seq_id}")
        return self.block_ids[position // self.block_size] * self.block_size + position % self.block_size


@runtime_checkable
class KVCacheManager(Protocol):
    """The cache API. Implementations keep reference counts so that forked prefixes share blocks
    (copy-on-write on the first append into a shared, partly filled block)."""

    def can_allocate(self, num_tokens: int) -> bool: ...

    def allocate(self, seq_id: int, num_tokens: int) -> KVCacheHandle: ...

    def append(self, handle: KVCacheHandle, num_tokens: int) -> KVCacheHandle: ...

    def fork(self, handle: KVCacheHandle, new_seq_id: int) -> KVCacheHandle: ...

    def truncate(self, handle: KVCacheHandle, num_tokens: int) -> KVCacheHandle: ...

    def free(self, handle: KVCacheHandle) -> None: ...

    @property
    def num_free_blocks(self) -> int: ...
