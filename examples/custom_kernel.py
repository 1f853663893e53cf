"""Register your own backend for a kernel op and watch the registry pick it, refuse it, and force it.

    python examples/custom_kernel.py [--tiny]

The backend here implements the catalogue op `rms_norm` (signature: `tessera/kernels/reference.py`) with
`torch.nn.functional.rms_norm`. Its `supports(...)` returns the reasons it cannot run some inputs (it
handles float32 and bfloat16 only), so the registry falls back to another backend for those and says why
when you force it. Parity is checked against the reference at the catalogue's tolerances, and a model
forward is shown to run through it, with logits equal to the reference's.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from tessera.kernels import registry
from tessera.kernels.parity import check_forward
from tessera.kernels.samples import samples
from tessera.model import Transformer
from tessera.specs import KernelUnavailableError, ModelConfig

BACKEND = "example_fused"
calls = {"n": 0}


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The op's contract: normalise over the last dim in float32, scale by `weight`, return in x's dtype."""
    calls["n"] += 1
    y = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return y.to(x.dtype)


def supports(x: Any = None, weight: Any = None, eps: Any = None) -> list[str]:
    """Reasons this backend cannot run these inputs (none: it can). Called without inputs by `tessera info`."""
    reasons = []
    if x is not None and x.dtype not in (torch.float32, torch.bfloat16):
        reasons.append(f"x.dtype {x.dtype} is not float32 or bfloat16")
    if x is not None and weight is not None and weight.shape != x.shape[-1:]:
        reasons.append(f"weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    return reasons


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a smaller model for the forward check")
    args = ap.parse_args(argv)

    registry.register("rms_norm", BACKEND, rms_norm_fused, supports=supports, priority=100)
    print(f"rms_norm backends, best first: {registry.backends('rms_norm')}")

    x, w = torch.randn(3, 64), torch.rand(64) + 0.5
    picked = registry.get("rms_norm", x, w, 1e-6)
    print(f"float32 input -> picked {picked.backend!r}")
    assert picked.backend == BACKEND

    x64 = x.double()
    fallback = registry.get("rms_norm", x64, w.double(), 1e-6)
    print(f"float64 input -> picked {fallback.backend!r} ({BACKEND} says: {supports(x64, w.double())})")
    assert fallback.backend != BACKEND
    try:
        registry.get("rms_norm", x64, w.double(), 1e-6, backend=BACKEND)
        raise AssertionError("forcing an unsupported backend must raise")
    except KernelUnavailableError as err:
        print(f"forced on float64 -> KernelUnavailableError: {err}")

    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        for sample in samples("rms_norm", dtype, seed=0):
            checked += check_forward("rms_norm", BACKEND, sample, dtype)
    print(f"parity with the reference at the catalogue's tolerances: {checked} samples ok")

    preset = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128) if args.tiny \
        else ModelConfig.preset("tiny-student")
    torch.manual_seed(0)
    model = Transformer(preset).eval()
    ids = torch.randint(0, preset.vocab_size, (2, 16))
    calls["n"] = 0
    with torch.no_grad():
        ours = model(ids)
    used = calls["n"]
    registry.pin("rms_norm", "reference")  # what TESSERA_KERNELS="rms_norm=reference" does from the environment
    with torch.no_grad():
        ref = model(ids)
    registry.pin("rms_norm", None)
    # At inference every norm that follows a residual add is fused with it (`rms_norm_residual`, another
    # op): the post-attention norms, and each block's input norm with the previous block's add, and the
    # final norm. Only the first block's input norm is a plain `rms_norm`. (With autograd on, blocks
    # return their sums and every input norm and the final norm come here: n_layers + 1.)
    expected = 1
    print(f"model forward: {used} rms_norm calls went to {BACKEND!r} "
          f"({expected} rms_norm ops per forward); max |logits - reference logits| = "
          f"{(ours - ref).abs().max().item():.2e}")
    assert used == expected
    torch.testing.assert_close(ours, ref)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
