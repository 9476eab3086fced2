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
