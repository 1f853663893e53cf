"""Run as a script under TRITON_INTERPRET=1 (CPU) or on CUDA: registry ops inside torch.compile with
fullgraph=True (any graph break raises) must match eager, forward and backward."""

from __future__ import annotations

import torch

from tessera.kernels import registry


def step(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
         k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = registry("rms_norm", x, w, 1e-6)
    o = registry("attention.prefill", q, k, v, cu, 8)
    registry("kv_cache.write", k.detach(), v.detach(), k_cache, v_cache, slots)
    y, _ = registry("rms_norm_residual", h.detach(), h.detach(), w.detach(), 1e-6)
    return h.sum() + o.float().square().sum(), y


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def inputs() -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
        x, w = r(5, 32).requires_grad_(), r(32).requires_grad_()
        q, k, v = (r(13, h, 32).requires_grad_() for h in (4, 2, 2))
        cu = torch.tensor([0, 8, 13], dtype=torch.int32, device=device)
        caches = torch.zeros(2, 4, 4, 2, 32, device=device)
        slots = torch.tensor([3, -1, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], device=device)
        return x, w, q, k, v, cu, caches[0], caches[1], slots

    eager_args, compiled_args = inputs(), inputs()
    for name in ("rms_norm", "attention.prefill", "kv_cache.write", "rms_norm_residual"):
        assert registry.get(name, *_example(name, eager_args)).backend == "triton", name
    loss, y = step(*eager_args)
    loss.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    c_loss, c_y = compiled(*compiled_args)
    c_loss.backward()
    torch.testing.assert_close(c_loss, loss)
    torch.testing.assert_close(c_y, y)
    for i in (0, 1, 2, 3, 4, 6, 7):
        a, b = eager_args[i], compiled_args[i]
        torch.testing.assert_close(b.grad if b.grad is not None else b, a.grad if a.grad is not None else a)
    print("compile-ok")


def _example(name: str, args: tuple[torch.Tensor, ...]) -> tuple:
    x, w, q, k, v, cu, kc, vc, slots = args
    return {"rms_norm": (x, w, 1e-6), "attention.prefill": (q, k, v, cu, 8),
            "kv_cache.write": (k.detach(), v.detach(), kc, vc, slots),
            "rms_norm_residual": (x.detach(), x.detach(), w.detach(), 1e-6)}[name]


if __name__ == "__main__":
    main()
