"""T6b/c/d: torch >= 2.10, no unsafe deserialisation and no pickle-based weight files anywhere in the package.

The checker reads the package's syntax trees (aliases such as `import pickle as p` or `from torch import load`
are followed) and is itself tested on snippets, so that it keeps catching what it is meant to catch.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "alignloop"
TORCH_FLOOR = (2, 10)

# Modules whose load functions run arbitrary code from a file.
_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
_PICKLE_LOADERS = {"load", "loads", "Unpickler", "open"}
_PICKLE_SUFFIXES = re.compile(r"\.(bin|pt|pth|pkl|pickle|ckpt)$")


class _Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.modules: dict[str, str] = {}  # local name -> module ("torch", "pickle", "numpy")
        self.functions: dict[str, str] = {}  # local name -> "module.func"
        self.problems: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            top = alias.name.split(".")[0]
            self.modules[alias.asname or top] = alias.name if alias.asname else top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = (node.module or "").split(".")[0]
        for alias in node.names:
            self.functions[alias.asname or alias.name] = f"{module}.{alias.name}"
            if module in _PICKLE_MODULES and alias.name in _PICKLE_LOADERS:
                self.problems.append((node.lineno, f"imports {module}.{alias.name}"))

    def _qualified(self, func: ast.expr) -> str | None:
        if isinstance(func, ast.Name):
            return self.functions.get(func.id)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            module = self.modules.get(func.value.id) or self.functions.get(func.value.id)
            return f"{module}.{func.attr}" if module else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualified(node.func) or ""
        module, _, attr = name.rpartition(".")
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}

        def is_true(key: str) -> bool:
            return isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is True

        def is_false(key: str) -> bool:
            return isinstance(kwargs.get(key), ast.Constant) and kwargs[key].value is False

        if name == "torch.load" and not is_true("weights_only"):
            self.problems.append((node.lineno, "torch.load without weights_only=True"))
        if name == "torch.save":
            self.problems.append((node.lineno, "torch.save writes a pickle; use safetensors and JSON"))
        if module.split(".")[0] in _PICKLE_MODULES and attr in _PICKLE_LOADERS:
            self.problems.append((node.lineno, f"{name} unpickles"))
        if name in ("numpy.load", "np.load") and is_true("allow_pickle"):
            self.problems.append((node.lineno, "numpy.load(allow_pickle=True)"))
        if isinstance(node.func, ast.Attribute) and node.func.attr == "save_pretrained" and is_false(
                "safe_serialization"):
            self.problems.append((node.lineno, "save_pretrained(safe_serialization=False) writes .bin"))
        if is_false("use_safetensors"):
            self.problems.append((node.lineno, "use_safetensors=False loads pickled weights"))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _PICKLE_SUFFIXES.search(node.value):
            self.problems.append((node.lineno, f"pickle-format weight file name {node.value!r}"))


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every unsafe load or pickle-based weight file in `source`.

    A file name such as "pytorch_model.bin" that is only mentioned (to refuse it, say) may carry `# T6-allow`
    on its line; unsafe calls cannot be allowed.
    """
    checker = _Checker()
    checker.visit(ast.parse(source))
    lines = source.splitlines()
    return sorted((line, what) for line, what in checker.problems
                  if not (what.startswith("pickle-format") and "# T6-allow" in lines[line - 1]))


def test_T6b_torch_floor():
    assert torch.__version__ >= "2.10", f"torch {torch.__version__} < 2.10 (CVE-2025-32434 and friends)"
    if sys.version_info >= (3, 11):
        import tomllib

        deps = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
        torch_req = [d for d in deps if re.match(r"torch\b", d)]
        floor = re.search(r">=\s*(\d+)\.(\d+)", torch_req[0]) if torch_req else None
        assert floor and tuple(map(int, floor.groups())) >= TORCH_FLOOR, f"pyproject torch floor: {torch_req}"


def test_T6c_T6d_package_has_no_unsafe_loads_or_pickle_weights():
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "runtime.py" in files
    problems = [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
                for path in files for line, what in unsafe_uses(path.read_text(encoding="utf-8"))]
    assert not problems, "unsafe deserialisation in the package:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load('x')",
        "import torch\ntorch.load('x', weights_only=False)",
        "import torch as T\nT.load(f, map_location='cpu')",
        "from torch import load\nload(f)",
        "from torch import load as L\nL(f)",
        "import torch\ntorch.save(sd, path)",
        "import pickle\npickle.load(f)",
        "import pickle\npickle.loads(b)",
        "import pickle as p\np.Unpickler(f).load()",
        "from pickle import loads",
        "import dill\ndill.load(f)",
        "import joblib\njoblib.load('m.joblib')",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "model.save_pretrained(out, safe_serialization=False)",
        "AutoModel.from_pretrained(name, use_safetensors=False)",
        "path = out / 'pytorch_model.bin'",
        "name = 'optimizer.pt'",
        "import torch\ntorch.load(f)  # T6-allow",
    ],
)
def test_T6c_checker_catches(source):
    assert unsafe_uses(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(f, weights_only=True)",
        "from safetensors.torch import load_file\nload_file('model.safetensors')",
        "import json\njson.loads(s)",
        "import numpy as np\nnp.load(f)",
        "model.save_pretrained(out)",
        "model.save_pretrained(out, safe_serialization=True)",
        "x = 'binary search'",
        "if (path / 'pytorch_model.bin').exists():  # T6-allow: refused below\n    raise ValueError(path)",
    ],
)
def test_T6c_checker_allows(source):
    assert not unsafe_uses(source), source
