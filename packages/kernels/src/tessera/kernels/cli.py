"""`tessera info`: the model presets with parameter counts and the op x backend availability table."""

from __future__ import annotations

import argparse
import json

from tessera.kernels import registry
from tessera.specs import ModelConfig


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main_info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tessera info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = parser.parse_args(argv)
    presets = []
    for name in ModelConfig.presets():
        cfg = ModelConfig.preset(name)
        presets.append({"preset": name, "params": cfg.num_params(), "d_model": cfg.d_model,
                        "layers": cfg.n_layers, "heads": f"{cfg.n_heads}/{cfg.n_kv_heads}", "vocab": cfg.vocab_size})
    ops = registry.table()
    if args.json:
        print(json.dumps({"presets": presets, "kernels": ops}, indent=2))
        return 0
    rows = [["preset", "params", "d_model", "layers", "heads q/kv", "vocab"]]
    rows += [[p["preset"], f"{p['params'] / 1e6:,.1f}M", str(p["d_model"]), str(p["layers"]), p["heads"],
              str(p["vocab"])] for p in presets]
    print(_table(rows))
    print()
    cols = [c for c in ops[0] if c != "op"]
    print(_table([["op", *cols]] + [[r["op"], *(r[c] for c in cols)] for r in ops]))
    return 0
