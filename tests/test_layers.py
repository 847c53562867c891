"""Layering (STYLE.md section 1): every module's imports, parsed with ast, point down only.

    kernels/ (triton only) <- fastweight/ops/ <- fastweight/losses/ <- fastweight/{data,train,eval,
    integrations,analysis}/ <- fastweight/pipelines/ <- examples/ (public API only)

Extra rules: ops import fastweight.kernels and triton only lazily (inside functions), so the torch path
runs where Triton is absent; nothing but ops touches fastweight.kernels; no library module imports
fastweight.reference (tests and benchmarks do); ops/losses never import model libraries.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("data", "train", "eval", "integrations", "analysis")
MODEL_LIBS = ("transformers", "accelerate", "datasets", "peft")
KERNEL_ALLOWED = ("triton", "triton.language", "fastweight.kernels._tl", "__future__")
# kernels/__init__.py hands a top-level ``import kernels`` (the checkout's root on sys.path) over to PyPI's
# distribution of that name; it needs the import machinery for that and nothing else.
KERNEL_INIT_ALLOWED = ("sys", "os", "importlib.machinery", "importlib.util")


def module_files():
    files = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "fastweight.kernels" if path.stem == "__init__" else f"fastweight.kernels.{path.stem}"
        files.append((name, path, True))
    for path in sorted((ROOT / "fastweight").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        files.append((".".join(parts), path, is_pkg))
    for path in sorted((ROOT / "examples").glob("*.py")) if (ROOT / "examples").is_dir() else []:
        files.append((f"examples.{path.stem}", path, False))
    return files


def imports_of(name: str, path: Path, is_pkg: bool):
    """Yield (target module, lazy, lineno); ``from a import b`` yields a and a.b (b may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if is_pkg else name.rpartition(".")[0]

    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, lazy, child.lineno
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (child.level - 1)]
                    base = ".".join(base_parts + ([child.module] if child.module else []))
                else:
                    base = child.module
                yield base, lazy, child.lineno
                for alias in child.names:
                    if alias.name != "*":
                        yield f"{base}.{alias.name}", lazy, child.lineno
            else:
                yield from walk(child, child_lazy)

    yield from walk(tree, False)


def under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def layer(mod: str):
    """Layer index of a fastweight module (None for the package root / unknown)."""
    if under(mod, "fastweight._constants", "fastweight._progress"):
        return -1
    if under(mod, "fastweight.kernels"):
        return 0
    if under(mod, "fastweight.ops"):
        return 1
    if under(mod, "fastweight.losses"):
        return 2
    if under(mod, *(f"fastweight.{u}" for u in UPPER)):
        return 3
    if under(mod, "fastweight.pipelines"):
        return 4
    if under(mod, "fastweight.reference"):
        return "reference"
    if mod == "fastweight" or under(mod, "fastweight.__init__"):
        return 5
    return None


def violations_of(src: str, target: str, lazy: bool) -> list[str]:
    out = []
    src_layer = layer(src) if not src.startswith("examples.") else "examples"
    if src_layer == 0:  # kernels: triton and the shared device helpers only
        if src == "fastweight.kernels" and target in KERNEL_INIT_ALLOWED:
            return out
        if not under(target, "fastweight.kernels") and target not in KERNEL_ALLOWED and not under(target, "triton"):
            out.append("kernels may import only triton, triton.language and fastweight.kernels._tl")
        elif under(target, "fastweight.kernels") and not under(target, "fastweight.kernels._tl") and target != "fastweight.kernels":
            out.append("kernels may share code only through fastweight.kernels._tl")
        return out
    if src_layer == "examples":  # examples: public API only
        if under(target, "fastweight"):
            parts = target.split(".")
            if any(p.startswith("_") for p in parts) or (len(parts) > 1 and parts[1] in ("kernels", "ops", "reference")):
                out.append("examples use the public API only (from fastweight import ...)")
        return out
    if under(target, "triton") and not lazy:
        out.append("triton may only be imported lazily (inside the Triton backend) outside kernels/")
    if under(target, "fastweight.kernels"):
        if src_layer != 1:
            out.append("only fastweight.ops may import fastweight.kernels")
        elif not lazy:
            out.append("fastweight.ops imports fastweight.kernels lazily (inside the Triton backend only)")
    if under(target, "fastweight.reference") and src_layer != "reference":
        out.append("library code never imports fastweight.reference (tests and benchmarks do)")
    if src_layer == "reference":
        if under(target, "fastweight") and not under(target, "fastweight.reference", "fastweight._constants"):
            out.append("fastweight.reference imports nothing from fastweight but IGNORE_INDEX (_constants)")
        return out
    if src_layer == -1 and under(target, "fastweight"):
        out.append("fastweight._constants imports nothing from fastweight")
    if src_layer in (1, 2) and under(target, *MODEL_LIBS):
        out.append("ops and losses never import model libraries (transformers, accelerate, datasets)")
    tgt_layer = layer(target)
    if tgt_layer == 5 and src_layer in (3, 4):
        return out  # data/train/eval/pipelines may use the public API root (it re-exports only losses)
    if isinstance(src_layer, int) and isinstance(tgt_layer, int) and tgt_layer > src_layer and src_layer != 5:
        out.append(f"upward import (layer {src_layer} -> {tgt_layer})")
    return out


FILES = module_files()


def test_files_found():
    names = {n for n, _, _ in FILES}
    assert {"fastweight.kernels.token_logprobs", "fastweight.ops.token_logprobs", "fastweight.losses.reweighted",
            "fastweight.reference.token_logprobs"} <= names


@pytest.mark.parametrize("name,path,is_pkg", FILES, ids=[n for n, _, _ in FILES])
def test_no_upward_imports(name, path, is_pkg):
    problems = []
    for target, lazy, lineno in imports_of(name, path, is_pkg):
        for why in violations_of(name, target, lazy):
            problems.append(f"{path.relative_to(ROOT)}:{lineno}: imports {target}: {why}")
    assert not problems, "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("src,target,lazy", [
    ("fastweight.ops.token_logprobs", "fastweight.kernels.token_logprobs", False),
    ("fastweight.ops.token_logprobs", "triton", False),
    ("fastweight.losses.reweighted", "fastweight.kernels.token_logprobs", True),
    ("fastweight.losses.reweighted", "fastweight.train.loop", True),
    ("fastweight.losses.reweighted", "transformers", False),
    ("fastweight.ops.token_logprobs", "fastweight.losses._input", True),
    ("fastweight.kernels.token_logprobs", "torch", False),
    ("fastweight.kernels.token_logprobs", "fastweight.ops._common", False),
    ("fastweight.reference.reweighted", "fastweight.ops.token_logprobs", False),
    ("fastweight.losses._input", "fastweight.reference.token_logprobs", False),
    ("fastweight.data.tofu", "fastweight.kernels._tl", True),
    ("examples.tofu_unlearn", "fastweight.ops.token_logprobs", False),
    ("examples.tofu_unlearn", "fastweight.losses._input", False),
    ("fastweight.losses.reweighted", "fastweight", False),
    ("fastweight.ops._common", "fastweight", True),
    ("fastweight.eval.tofu", "fastweight.pipelines.common", True),
    ("fastweight.train.loop", "fastweight.pipelines", False),
])
def test_checker_catches(src, target, lazy):
    # The checker itself must be able to fail: each of these is a forbidden arrow.
    assert violations_of(src, target, lazy)


@pytest.mark.parametrize("src,target,lazy", [
    ("fastweight.ops.token_logprobs", "fastweight.kernels.token_logprobs", True),
    ("fastweight.ops.token_logprobs", "fastweight._constants", False),
    ("fastweight.losses.reweighted", "fastweight.ops.token_logprobs", False),
    ("fastweight.train.loop", "transformers", False),
    ("fastweight.kernels.token_logprobs", "fastweight.kernels._tl", False),
    ("fastweight.reference.reweighted", "fastweight._constants", False),
    ("examples.tofu_unlearn", "fastweight", False),
    ("examples.tofu_unlearn", "fastweight.pipelines.tofu", False),
    ("fastweight.pipelines.tofu", "fastweight.train.loop", False),
    ("fastweight.pipelines.common", "fastweight.eval.store", False),
])
def test_checker_allows(src, target, lazy):
    assert not violations_of(src, target, lazy)


def test_import_fastweight_does_not_import_triton():
    # On failure the message shows which fastweight line pulled Triton in (directly or through torch,
    # e.g. a module-level torch.compiler.disable imports torch._dynamo, which imports triton).
    code = ("import sys, builtins, traceback, torch\n"
            "_imp, first = builtins.__import__, []\n"
            "def imp(name, *a, **k):\n"
            "    if (name == 'triton' or name.startswith('triton.')) and not first:\n"
            "        first.append([l for l in traceback.format_stack() if 'fastweight' in l])\n"
            "    return _imp(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "import fastweight\n"
            "x = torch.randn(3, 5, requires_grad=True)\n"
            "fastweight.satimp_loss(x, torch.tensor([1, 2, -100])).backward()\n"
            "fastweight.token_logprobs(x, torch.tensor([0, 4, 3]))\n"
            "bad = sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'fastweight.kernels')))\n"
            "assert not bad, 'triton imported; first import from:\\n' + ''.join(first[0] if first else [])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torch_path_runs_without_triton():
    # Where Triton is absent (macOS, Windows, CPU-only installs) the package must import and the torch
    # backend must run: block `import triton` in a fresh interpreter and exercise the public API.
    # torch itself is imported first: torch >= 2.14 probes importlib.util.find_spec('triton') at import (an
    # absent Triton answers None there, which a blocking finder cannot imitate); fastweight is what is tested.
    code = ("import sys\n"
            "import torch\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'triton' or name.startswith('triton.'):\n"
            "            raise ModuleNotFoundError('triton blocked for this test', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "for m in [m for m in sys.modules if m == 'triton' or m.startswith('triton.')]:\n"
            "    del sys.modules[m]\n"
            "import fastweight\n"
            "x = torch.randn(2, 3, 5, requires_grad=True)\n"
            "y = torch.tensor([[1, 2, -100], [0, 4, 3]])\n"
            "fastweight.satimp_loss(x, y, shift=True).backward()\n"
            "h, w = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)\n"
            "fastweight.wga_loss(h, torch.tensor([1, 2, 3, 4]), lm_head=w, reduction='sum').backward()\n"
            "assert x.grad is not None and w.grad is not None\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
