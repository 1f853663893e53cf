"""Build (or load the cached build of) the CUDA C++ extension with nvcc for Hopper (sm_90a).

    python -m tessera.kernels.cuda.build          # compile once; later imports load the cached .so

The build goes through `torch.utils.cpp_extension.load` into a directory named by a hash of the
sources, so an edited source rebuilds and an unchanged one loads in milliseconds.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "rms_norm.cu", "attention.cu", "quant_gemv.cu")
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)
NVCC_FLAGS = ("-O3", "-lineinfo", "--use_fast_math", "-std=c++17", *ARCH_FLAGS)
NAME = "tessera_cuda_kernels"


@functools.cache
def nvcc_path() -> str | None:
    """nvcc from CUDA_HOME, else from PATH; None when there is no CUDA toolkit. Looked up once per
    process: `supports()` asks on every dispatch, and a file-system search there costs more than the op."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build_dir() -> Path:
    """Cache directory for this exact set of sources."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in CSRC.iterdir()):
        digest.update(name.encode() + (CSRC / name).read_bytes())
    root = Path(os.environ.get("TESSERA_CUDA_CACHE", Path.home() / ".cache" / "tessera" / "cuda"))
    return root / digest.hexdigest()[:16]


@functools.cache
def load(verbose: bool = False) -> ModuleType:
    """Compile if needed and import the extension. Raises RuntimeError when nvcc is missing."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("building tessera's CUDA kernels needs nvcc (set CUDA_HOME or put nvcc on PATH)")
    os.environ.setdefault("CUDA_HOME", str(Path(nvcc).parents[1]))
    from torch.utils.cpp_extension import load as load_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    return load_extension(name=NAME, sources=[str(CSRC / s) for s in SOURCES], extra_cuda_cflags=list(NVCC_FLAGS),
                          extra_cflags=["-O3", "-std=c++17"], extra_include_paths=[str(CSRC)],
                          build_directory=str(out), verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera.kernels.cuda.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    module = load(verbose=args.verbose)
    print(f"built {module.__file__} in {time.perf_counter() - start:.1f}s (cache {build_dir()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
