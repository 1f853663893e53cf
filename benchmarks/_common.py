"""What every benchmark shares: the result file's provenance (date, device, commit, command) and a
printed table. Results go to benchmarks/results/<name>-<device>-<date>.json."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    if os.environ.get("TESSERA_COMMIT"):  # set by whoever ships the tree to a machine without git
        return os.environ["TESSERA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=RESULTS.parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=RESULTS.parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({platform.processor() or platform.machine()})"


def provenance() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(),
        "commit": _commit(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:  # the programmatic-dependent-launch mode the decode kernels launched with (TESSERA_PDL)
        from tessera.kernels.triton import pdl

        info["pdl_mode"] = pdl.mode()
    except ImportError:
        pass
    return info


def require_positive(parser: Any, args: Any, *names: str) -> None:
    """A usage error (naming the flag and the value) for any of these integer options below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def persistent_variant(text: str) -> str:
    """argparse type of `--persistent-variants`: `text` itself, once `tessera.model.persistent.parse_options`
    accepts it."""
    from tessera.model import persistent

    try:
        persistent.parse_options(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write `payload` with provenance; returns the path. `out_dir` defaults to benchmarks/results."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = provenance()
    slug = meta["device"].split("(")[0].strip().lower().replace(" ", "-") or "device"
    path = out_dir / f"{name}-{slug}-{meta['date'][:10]}.json"
    path.write_text(json.dumps({"benchmark": name, **meta, **payload}, indent=2, default=str) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], title: str | None = None) -> None:
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)


def median_seconds(fn: Any, repeats: int, warmup: int, cuda: bool) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls: CUDA events on a GPU (the
    work is asynchronous), perf_counter on a CPU."""
    import statistics
    import time

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(device: Any, cuda: bool, tiny: bool) -> dict[str, float]:
    """The two ceilings every figure is a fraction of, measured on `device` in this run: device-copy
    bandwidth (bytes/s, read + write, 1 GiB buffers) and bf16 matmul FLOP/s (8192^3, random data)."""
    import torch

    n = (1 << 22) if tiny else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), 5 if tiny else 20, 2, cuda)
    m = 256 if tiny else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_s = median_seconds(lambda: a @ b, 3 if tiny else 20, 1, cuda)
    return {"copy_bytes_per_s": 2 * n / copy_s, "bf16_mm_flops": 2 * m**3 / mm_s}
