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


def check(name: str, workdir: Path) -> None:
    venv = workdir / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    paths = [str(PACKAGES[d]) for d in internal_deps(name)]
    pip = [py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, *paths], check=True)
    if name in EXTRAS:
        subprocess.run([py, "-c", f"import tessera.{name}"], check=True)
        print(f"ok: tessera-{name} imports without its [{EXTRAS[name]}] extra")
        subprocess.run([*pip, f"{PACKAGES[name]}[{EXTRAS[name]}]"], check=True)
    code = f"import importlib\nfor m in {modules(name)!r}:\n    importlib.import_module(m)\n"
    if name in NO_TORCH:
        code += "import importlib.util\nassert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
    subprocess.run([py, "-c", code], check=True)
    print(f"ok: tessera-{name} installs alone and imports {len(modules(name))} modules")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("packages", nargs="*", default=sorted(PACKAGES), help="package folder names (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.packages:
            check(name, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
