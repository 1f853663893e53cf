"""`compile_sm90`: compile a Triton kernel for sm_90 through ptxas, no GPU needed. (`run_check`, which
runs this folder's check scripts in a fresh interpreter, is in tests/conftest.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import triton


def _compile_sm90(fn: object, ptrs: dict[str, str], consts: dict[str, object] | None = None,
                  ints: dict[str, int] | None = None, warps: int = 4, stages: int = 2) -> object:
    """Compile a Triton kernel (autotuned, heuristic-wrapped or plain) for sm_90 through ptxas; no GPU
    needed. `ptrs`: pointer arguments and their element types (16-byte aligned); `consts`: constexpr
    values (the others keep their defaults); `ints`: integer arguments as a launch would specialise them
    (1 becomes a constant, multiples of 16 carry the divisibility hint). Any other argument is an i32, or
    an fp32 when it is `eps` or `scale_log2`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    consts, ints = consts or {}, ints or {}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            signature[name], attrs[(i,)] = "*" + ptrs[name], [["tt.divisibility", 16]]
        elif name in consts or fn.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", consts.get(name, fn.params[i].default)
        elif ints.get(name) == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif name in ("eps", "scale_log2"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in ints and ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    assert compiled.asm["cubin"]
    return compiled


@pytest.fixture
def compile_sm90():
    """`_compile_sm90`; the test skips where Triton ships no ptxas."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton ships no ptxas here")
    return _compile_sm90
