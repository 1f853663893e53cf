"""Start `world` processes of a script the way torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT set)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: What a rank prints when the rendezvous port was taken between `free_port` and rank 0's bind (another
#: process's connection can land on it while the ranks import torch).
_PORT_TAKEN = ("EADDRINUSE", "address already in use")

#: What a worker prints (flushed) once its work is done and its process group destroyed. A rank that printed it
#: and was then killed by a signal (gloo's threads can abort the interpreter's teardown: "terminate called without
#: an active exception", seen once in a CI run) finished everything a test reads, so it counts as done.
DONE = "tessera-rank-done"


def _failed(returncode: int, output: str) -> bool:
    return returncode != 0 and not (returncode < 0 and DONE in output)


def launch(script: Path, args: list[str], world: int, timeout: float = 120.0, attempts: int = 3) -> None:
    """Run `python script *args` on `world` ranks over gloo; raises with every rank's output if one fails (a
    rank killed by a signal after printing `DONE` died in teardown, not in its work, and passes). A run that
    failed only because its rendezvous port was taken meanwhile is started again on a new port."""
    for attempt in range(attempts):
        try:
            return _launch_once(script, args, world, timeout)
        except RuntimeError as exc:
            if attempt + 1 == attempts or not any(m in str(exc).lower() for m in map(str.lower, _PORT_TAKEN)):
                raise


def _launch_once(script: Path, args: list[str], world: int, timeout: float) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(_failed(p.returncode, o) for p, o in zip(procs, outputs)):
        detail = "\n".join(f"--- rank {i} (exit {p.returncode}):\n{o[-3000:]}" for i, (p, o) in
                           enumerate(zip(procs, outputs)))
        raise RuntimeError(f"{script.name} failed on {world} ranks:\n{detail}")
