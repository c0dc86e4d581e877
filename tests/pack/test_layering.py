"""Imports flow one way (docs/architecture.md, "Layers"): each package of the pack imports only packages below it,
and the scripts use no test code. Read from the source with ast, so a lazy import inside a function counts too."""
import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Top to bottom. A package may import itself and anything listed after it, never anything before it.
LAYERS = ("nodes", "train", "attention", "samplers", "concepts", "weights", "encoders", "faces", "core", "folders")


def pack_imports(path: str, package: str) -> set:
    """The pack's top-level packages that a module imports (relative imports and comfyui_likeness.* alike)."""
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:       # inside the same package
                target = package
            elif node.level == 2:     # a sibling package: from ..weights.eaa import ...
                target = (node.module or "").split(".")[0]
            elif node.module and node.module.startswith("comfyui_likeness."):
                target = node.module.split(".")[1]
            else:
                continue
            if target:
                found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "comfyui_likeness" and len(parts) > 1:
                    found.add(parts[1])
    return found


def pack_modules():
    for layer in LAYERS:
        if layer == "folders":
            yield layer, os.path.join(REPO, "folders.py")
            continue
        for name in sorted(os.listdir(os.path.join(REPO, layer))):
            if name.endswith(".py"):
                yield layer, os.path.join(REPO, layer, name)


@pytest.mark.parametrize("layer,path", list(pack_modules()), ids=lambda v: os.path.relpath(v, REPO) if "/" in str(v) else v)
def test_imports_go_down_the_layers(layer, path):
    rank = LAYERS.index(layer)
    upward = sorted(t for t in pack_imports(path, layer) if t in LAYERS and LAYERS.index(t) < rank)
    assert not upward, f"{os.path.relpath(path, REPO)} ({layer}) imports {upward}, which sit above it in {LAYERS}"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..nodes.fusion import x\n    from comfyui_likeness.train import cli\n")
    assert pack_imports(str(bad), "weights") == {"nodes", "train"}


def test_every_package_says_what_lives_in_it():
    for layer in LAYERS:
        if layer == "folders":
            continue
        doc = ast.get_docstring(ast.parse(open(os.path.join(REPO, layer, "__init__.py")).read())) or ""
        assert len(doc.split()) >= 12, f"{layer}/__init__.py needs a docstring that says what lives there"


def test_scripts_use_no_test_code():
    for name in sorted(os.listdir(os.path.join(REPO, "scripts"))):
        if not name.endswith(".py"):
            continue
        text = open(os.path.join(REPO, "scripts", name)).read()
        assert not re.search(r"path\.join\([^)]*[\"']tests[\"']", text), f"scripts/{name} puts tests/ on the import path"
        tree = ast.parse(text)
        support = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(REPO, "tests", "support"))}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for n in names:
                assert n.split(".")[0] not in support, f"scripts/{name} imports test code ({n})"
