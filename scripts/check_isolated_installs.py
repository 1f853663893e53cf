"""Install each package alone in a fresh venv (its declared dependencies only) and import every module.

An import that the package does not declare fails here. `tessera-specs` must also leave torch
uninstallable-by-accident: after installing it alone, `import torch` must fail.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {p.name: p for p in sorted((ROOT / "packages").iterdir()) if (p / "pyproject.toml").exists()}
NO_TORCH = {"specs", "jaxref"}
# Optional extras: the package must import without them; with them, every module must import.
EXTRAS = {"kernels": "triton"}


def internal_deps(name: str) -> list[str]:
    """The closure of tessera-* dependencies of packages/<name>, itself included."""
    seen: list[str] = []
    todo = [name]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.append(cur)
        deps = tomllib.loads((PACKAGES[cur] / "pyproject.toml").read_text())["project"]["dependencies"]
        todo += [m.group(1) for d in deps if (m := re.match(r"tessera-(\w+)", d))]
    return seen


def modules(name: str) -> list[str]:
    src = PACKAGES[name] / "src"
    return sorted(".".join(p.relative_to(src).with_suffix("").parts) for p in (src / "tessera" / name).rglob("*.py")
                  if p.name != "__main__.py")


def _run(cmd: list[str], log: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.append(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{''.join(log)}")


def check(name: str, workdir: Path) -> str:
    """Install and import one package in its own venv; returns its report lines (raises with the log)."""
    venv = workdir / name
    log: list[str] = []
    _run([sys.executable, "-m", "venv", str(venv)], log)
    py = str(venv / "bin" / "python")
    paths = [str(PACKAGES[d]) for d in internal_deps(name)]
    pip = [py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    _run([*pip, *paths], log)
    lines = []
    if name in EXTRAS:
        _run([py, "-c", f"import tessera.{name}"], log)
        lines.append(f"ok: tessera-{name} imports without its [{EXTRAS[name]}] extra")
        _run([*pip, f"{PACKAGES[name]}[{EXTRAS[name]}]"], log)
    code = f"import importlib\nfor m in {modules(name)!r}:\n    importlib.import_module(m)\n"
    if name in NO_TORCH:
        code += "import importlib.util\nassert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
    _run([py, "-c", code], log)
    lines.append(f"ok: tessera-{name} installs alone and imports {len(modules(name))} modules")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("packages", nargs="*", metavar="PACKAGE",
                        help=f"package folder names (default: all of {sorted(PACKAGES)})")
    parser.add_argument("--jobs", type=int, default=3, help="packages checked at once (default: 3; installs are "
                        "mostly unpacking, so a 2-core machine still gains from 3)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    unknown = [p for p in args.packages if p not in PACKAGES]
    if unknown:
        parser.error(f"unknown package(s) {unknown}; known: {sorted(PACKAGES)}")
    args.packages = args.packages or sorted(PACKAGES)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(check, name, Path(tmp)): name for name in args.packages}
        for future in as_completed(futures):
            try:
                print(future.result(), flush=True)
            except RuntimeError as exc:
                failed += 1
                print(f"FAIL: tessera-{futures[future]}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
