"""The `tessera` command. Each subcommand lives in its own package's `cli` module and is imported
only when used, so a missing package costs nothing until its subcommand is asked for."""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    distribution: str
    help: str


COMMANDS: dict[str, Command] = {
    "info": Command("tessera.kernels.cli", "tessera-kernels", "presets, parameter counts and the op x backend table"),
    "train": Command("tessera.distill.cli", "tessera-distill", "pretrain a model with cross-entropy"),
    "distill": Command("tessera.distill.cli", "tessera-distill", "distill a teacher into a student"),
    "quantize": Command("tessera.quant.cli", "tessera-quant", "post-training quantization (int8, AWQ int4, FP8)"),
    "generate": Command("tessera.serve.cli", "tessera-serve", "generate text offline from a checkpoint"),
    "bench": Command("tessera.serve.cli", "tessera-serve", "measure serving throughput and latency"),
    "serve": Command("tessera.gateway.cli", "tessera-gateway", "run the OpenAI-compatible HTTP server"),
    "demo": Command("tessera.demo", "tessera", "the whole job: train, distill, quantize, serve, answer"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tessera <command> [options]   (tessera <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None:
        print(f"tessera: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        if exc.name and cmd.module.startswith(exc.name):
            print(f"tessera {name}: needs the {cmd.distribution} package (pip install {cmd.distribution})",
                  file=sys.stderr)
            return 2
        raise
    entry = getattr(module, "main_" + name.replace("-", "_"))
    return int(entry(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
