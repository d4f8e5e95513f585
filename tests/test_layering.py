"""The layering of DESIGN.md, read from the source with `ast`: interp < datamodules < lightning_modules < callbacks
< study (analyze.py's stages) < the entry points; each layer imports only the layers below it, lazy imports inside
functions included, and interp/ imports no Lightning."""

import ast

import pytest
from pipeline_utils import REPO

LAYERS = ("interp", "datamodules", "lightning_modules", "callbacks", "study")
LIGHTNING = ("lightning", "pytorch_lightning", "torchmetrics")


def _imported_modules(path) -> set[str]:
    """Every module that `path` imports by absolute name, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _offenders(package: str, forbidden: set[str]) -> list[str]:
    return [f"{path.relative_to(REPO)} imports {name}"
            for path in sorted((REPO / package).rglob("*.py"))
            for name in sorted(_imported_modules(path)) if name.split(".")[0] in forbidden]  # fmt: skip


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_no_layer_imports_from_a_layer_above_it(package):
    above = set(LAYERS[LAYERS.index(package) + 1 :])
    offenders = _offenders(package, above)
    assert not offenders, "\n".join(offenders)


def test_interp_imports_no_lightning():
    offenders = _offenders("interp", set(LIGHTNING))
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_lazy_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import torch\n\ndef f():\n    from callbacks.held_out import HeldOutEvaluation\n")
    assert _imported_modules(source) == {"torch", "callbacks.held_out"}
