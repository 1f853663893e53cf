"""Run as a script under TRITON_INTERPRET=1: second-order gradients of the Triton `rope` and `rope_qk_norm`
(whose backward runs the transposed rotation, itself differentiable) against the torch reference's,
for every input including cos/sin with unequal halves. Prints one JSON list of failures, then "rope-ok"."""

from __future__ import annotations

import torch
from check_report import report, seed_arg

from tessera.kernels import reference, registry


def _inputs(gen: torch.Generator, qk_norm: bool) -> list[torch.Tensor]:
    n, hq, hkv, d = 5, 4, 2, 32
    tensors = [torch.randn(n, hq, d, generator=gen), torch.randn(n, hkv, d, generator=gen),
               torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)]
    if qk_norm:
        tensors += [torch.randn(d, generator=gen) * 0.3 + 1, torch.randn(d, generator=gen) * 0.3 + 1]
    return tensors


def _second_order(fn: object, leaves: list[torch.Tensor], extra: tuple, dys: list[torch.Tensor],
                  vs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d/d(inputs) of <grad(outputs . dys), vs>: exercises the backward's own backward."""
    leaves = [t.clone().requires_grad_(True) for t in leaves]
    outs = fn(*leaves, *extra)
    grads = torch.autograd.grad(outs, leaves, dys, create_graph=True)
    total = sum((g * v).sum() for g, v in zip(grads, vs))
    return list(torch.autograd.grad(total, leaves, allow_unused=True))


def main(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []
    for op, extra in (("rope", ()), ("rope_qk_norm", (1e-6,))):
        leaves = _inputs(gen, op == "rope_qk_norm")
        dys = [torch.randn(t.shape, generator=gen) for t in leaves[:2]]
        vs = [torch.randn(t.shape, generator=gen) for t in leaves]
        got = _second_order(registry.get(op, backend="triton"), leaves, extra, dys, vs)
        want = _second_order(reference.REFERENCES[op], leaves, extra, dys, vs)
        for i, (g, w) in enumerate(zip(got, want)):
            g = torch.zeros_like(leaves[i]) if g is None else g
            w = torch.zeros_like(leaves[i]) if w is None else w
            err = float((g - w).norm() / w.norm().clamp_min(1e-30))
            if err > 1e-4:
                failures.append(f"{op}: second-order grad of input {i}: relative error {err:.3g}")
    return report(failures, "rope-ok")


if __name__ == "__main__":
    raise SystemExit(main(seed_arg()))
