"""Serving with tensor parallelism: rank 0 schedules and samples, every rank runs the model.

`launch_tp_engine` spawns `tensor_parallel_size - 1` worker processes (one per extra GPU, or CPU
processes over gloo), loads each rank's shard (`tensor_parallel.load_tp_model`), and returns an
`LLMEngine` on rank 0 whose model runner first broadcasts every step to the workers. Each step is
encoded as one int64 tensor (no pickling), so all ranks run the same forward, with the same
collectives, in the same order; only rank 0 samples, and the tokens it picks come back to the
workers inside the next step. Nothing a worker computes can make the ranks diverge.
"""

from __future__ import annotations

import atexit
import socket
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tessera.serve.engine import LLMEngine, resolve_device
from tessera.serve.loader import serving_dtype
from tessera.serve.model_runner import ModelRunner, StepInput
from tessera.serve.tensor_parallel import load_tp_model
from tessera.specs import EngineConfig, KVCacheHandle

OP_STOP, OP_FORWARD, OP_COPY = 0, 1, 2


def encode_step(step: StepInput) -> list[int]:
    """StepInput -> flat ints: [n_seqs, n_rows, block_size, per seq (seq_id, num_tokens, start, n_blocks,
    n_tokens, *block_ids, *tokens), *logit_rows]."""
    block_size = step.handles[0].block_size if step.handles else 1
    out = [len(step.handles), len(step.logit_rows), block_size]
    for h, toks, start in zip(step.handles, step.tokens, step.starts, strict=True):
        out += [h.seq_id, h.num_tokens, start, len(h.block_ids), len(toks), *h.block_ids, *toks]
    out += list(step.logit_rows)
    return out


def decode_step(flat: Sequence[int]) -> StepInput:
    n_seqs, n_rows, block_size = flat[:3]
    i = 3
    handles, tokens, starts = [], [], []
    for _ in range(n_seqs):
        seq_id, num_tokens, start, n_blocks, n_toks = flat[i:i + 5]
        i += 5
        handles.append(KVCacheHandle(seq_id=seq_id, block_ids=tuple(flat[i:i + n_blocks]), num_tokens=num_tokens,
                                     block_size=block_size))
        i += n_blocks
        tokens.append(list(flat[i:i + n_toks]))
        i += n_toks
        starts.append(start)
    return StepInput(handles, tokens, starts, list(flat[i:i + n_rows]))


class _Channel:
    """Rank 0 -> all ranks: an (op, length) header, then an int64 payload of that length."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.device, self.group = device, group

    def send(self, op: int, payload: Sequence[int] = ()) -> None:
        dist.broadcast(torch.tensor([op, len(payload)], dtype=torch.int64, device=self.device), 0, group=self.group)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.int64, device=self.device), 0, group=self.group)

    def recv(self) -> tuple[int, list[int]]:
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        dist.broadcast(header, 0, group=self.group)
        op, n = header.tolist()
        if not n:
            return op, []
        payload = torch.empty(n, dtype=torch.int64, device=self.device)
        dist.broadcast(payload, 0, group=self.group)
        return op, payload.tolist()


class BroadcastingRunner:
    """Rank 0's model runner: tells the workers what to run, then runs its own shard."""

    def __init__(self, runner: ModelRunner, channel: _Channel) -> None:
        self.runner, self.channel = runner, channel

    def forward(self, step: StepInput) -> torch.Tensor:
        self.channel.send(OP_FORWARD, encode_step(step))
        return self.runner.forward(step)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        if pairs:
            self.channel.send(OP_COPY, [x for p in pairs for x in p])
        self.runner.copy_blocks(pairs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.runner, name)


def _device_for(rank: int, config: EngineConfig) -> torch.device:
    device = resolve_device(config.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _init(rank: int, world: int, port: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)


def _worker_main(rank: int, world: int, port: int, path: str, config_json: str) -> None:
    config = EngineConfig.from_json(config_json)
    device = _device_for(rank, config)
    _init(rank, world, port, device)
    try:
        model = load_tp_model(path, device=device, dtype=serving_dtype(config, device))
        channel = _Channel(device)
        num_blocks = torch.zeros(1, dtype=torch.int64, device=device)
        dist.broadcast(num_blocks, 0)
        runner = ModelRunner(model, num_blocks=int(num_blocks), block_size=config.block_size,
                             max_model_len=config.max_model_len or model.config.max_seq_len,
                             dtype=serving_dtype(config, device), device=device, enforce_eager=True)
        while True:
            op, payload = channel.recv()
            if op == OP_STOP:
                break
            if op == OP_FORWARD:
                runner.forward(decode_step(payload))
            elif op == OP_COPY:
                runner.copy_blocks(list(zip(payload[0::2], payload[1::2])))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPEngineHandle:
    """Owns the worker processes; `close()` stops them (also run at interpreter exit)."""

    def __init__(self, engine: LLMEngine, channel: _Channel, workers: list[mp.process.BaseProcess]) -> None:
        self.engine, self.channel, self.workers = engine, channel, workers
        self.closed = False
        atexit.register(self.close)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.channel.send(OP_STOP)
        for w in self.workers:
            w.join(timeout=30)
        dist.destroy_process_group()


def launch_tp_engine(path: str | Path, config: EngineConfig, *, tokenizer: object | None = None,
                     draft_model: torch.nn.Module | None = None, model_name: str | None = None) -> TPEngineHandle:
    """Start `config.tensor_parallel_size` ranks over the model in `path` (tessera or HF directory) and
    return the handle whose `.engine` is rank 0's `LLMEngine`. CUDA graphs are off under tensor
    parallelism (every rank runs eagerly, in lockstep). Raises ValueError when the model cannot be
    split that many ways, or when fewer GPUs than ranks are visible."""
    world = config.tensor_parallel_size
    if world < 2:
        raise ValueError(f"tensor_parallel_size must be at least 2 here, got {world}")
    config = config.model_copy(update={"enforce_eager": True})
    device = _device_for(0, config)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs, {torch.cuda.device_count()} visible")
    port = _free_port()
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker_main, args=(r, world, port, str(path), config.to_json()), daemon=True)
               for r in range(1, world)]
    for w in workers:
        w.start()
    _init(0, world, port, device)
    model = load_tp_model(path, device=device, dtype=serving_dtype(config, device))
    engine = LLMEngine(model, tokenizer, config, draft_model=draft_model,  # type: ignore[arg-type]
                       model_name=model_name or Path(path).resolve().name)
    dist.broadcast(torch.tensor([engine.num_blocks], dtype=torch.int64, device=device), 0)
    channel = _Channel(device)
    engine.runner = BroadcastingRunner(engine.runner, channel)  # type: ignore[assignment]
    engine.overlap = False  # the workers' steps are broadcast as host token ids, not device ones
    return TPEngineHandle(engine, channel, workers)
