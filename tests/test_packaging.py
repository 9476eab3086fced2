"""Packaging: every sub-package is installed, kernels/ only as fastpref.kernels, and `import fastpref` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastpref").rglob("__init__.py")}
    found.add("fastpref.kernels")
    assert listed == found
    assert config["tool"]["setuptools"]["package-dir"] == {"fastpref.kernels": "kernels"}


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          cwd="/").stdout.strip()


def test_import_is_light_and_kernels_is_namespaced():
    out = _run(
        "import sys, importlib.util, fastpref\n"
        "heavy = [m for m in ('transformers', 'trl', 'datasets', 'accelerate', 'peft', 'triton') if m in sys.modules]\n"
        "print(heavy, importlib.util.find_spec('kernels') is None or 'site-packages' in "
        "importlib.util.find_spec('kernels').origin)"
    )
    assert out == "[] True"
    out = _run("import fastpref.kernels as k; print(k.__name__, hasattr(k, 'fold_logsumexp'))")
    assert out == "fastpref.kernels True"


def test_first_call_outside_a_compile_does_not_import_dynamo():
    """The ops' graph break for torch.compile (``utils.compile.eager_op``) imports torch._dynamo only under a
    compile: an eager first call would otherwise pay the import (2-3 s on a 2-core CPU, more when busy)."""
    out = _run(
        "import sys, torch, fastpref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h = torch.randn(4, 5, 8, generator=g, requires_grad=True); w = torch.randn(11, 8, generator=g)\n"
        "y = torch.randint(0, 11, (4, 5), generator=g)\n"
        "fastpref.DPOLoss()(h, w, y, ref_logps=torch.zeros(4)).loss.backward()\n"
        "fastpref.sequence_logps(h, w, y)\n"
        "print('torch._dynamo' in sys.modules)"
    )
    assert out == "False"


def test_compiled_caller_still_breaks_the_graph_at_the_op():
    """Under torch.compile the op is still the disabled function, on the first call and after: Dynamo breaks the
    graph there instead of tracing the chunk loops (their host sync and data-dependent chunking), so no captured
    graph holds their matmuls, and the result is eager's."""
    import torch

    import fastpref

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (4, 5), generator=g)
    loss_fn = fastpref.DPOLoss(backend="torch")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def step(x):
        return loss_fn(x * 2.0, w, y, ref_logps=torch.zeros(4)).loss

    compiled = torch.compile(step, backend=backend)
    for x in (h, h + 1.0):
        torch.testing.assert_close(compiled(x), step(x))
    assert graphs and not any(op in code for code in graphs for op in ("mm(", "matmul", "linear", "logsumexp")), graphs


# The layers of docs/design.md, lowest first: a module may import its own layer and the ones ranked below it.
# ``core`` is the top-level modules of fastpref (and compat, the Liger drop-ins over them); data sits beside it.
LAYER_RANKS = {"utils": 0, "kernels": 1, "ops": 2, "losses": 3, "core": 4, "data": 4, "integrations": 5,
               "benchmark": 6, "testing": 7, "cli": 8}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[1:2] == ["cli"] or len(parts) == 1:
        return "cli" if parts[1:2] == ["cli"] else "core"
    return parts[1] if parts[1] in LAYER_RANKS else "core"


def _fastpref_imports(path: Path) -> set[str]:
    """Every fastpref module ``path`` imports, at the top or inside a function (lazily)."""
    import ast

    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["fastpref", *rel.parts] if rel.parts[0] == "kernels" else list(rel.parts)  # fastpref.kernels
    package = parts[:-1]  # a module's package; an __init__'s is its own folder
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            if not node.module:  # `from . import losses`: the names are modules
                found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] == "fastpref"}


def test_no_module_imports_a_layer_above_it():
    """docs/design.md's one-way layers, checked on the source (lazy imports included): no import goes to another
    layer of the same or a higher rank (e.g. benchmark -> testing, or ops -> losses)."""
    files = [*(ROOT / "fastpref").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
    upward = []
    for path in files:
        rel = path.relative_to(ROOT).with_suffix("")
        own = "kernels" if rel.parts[0] == "kernels" else _layer(".".join(rel.parts))
        for target in _fastpref_imports(path):
            layer = _layer(target)
            if layer != own and LAYER_RANKS[layer] >= LAYER_RANKS[own]:
                upward.append(f"{rel} ({own}) imports {target} ({layer})")
    assert not upward, "\n".join(sorted(upward))


def test_the_checkout_never_shadows_hugging_faces_kernels_package():
    """Run from a checkout's root (``python -m pytest``), ``import kernels`` must reach Hugging Face's package
    (transformers >= 5.25 imports it at start) or fail as it would without this checkout, never this folder;
    ``fastpref.kernels`` still imports in the same process."""
    code = ("import sys\n"
            "try:\n    import kernels\n    where = kernels.__file__\n"
            "except ModuleNotFoundError:\n    where = 'absent'\n"
            "import fastpref.kernels\nprint(where)\nprint(fastpref.kernels.linear_fold.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    where, module = out.stdout.split()
    assert where == "absent" or Path(where).resolve() != (ROOT / "kernels" / "__init__.py").resolve(), where
    assert module == "fastpref.kernels.fused_gemm"
