"""The registry's explicit list of layer modules (pretrain/models/registry.py) names every
module under pretrain/models/layers that registers a mixer or an FFN: a file left out would
silently drop its layers from the trainer and from the remote-code export."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path


def _registering_modules() -> set[str]:
    """Layer modules whose source has a ``@register_mixer(...)`` or ``@register_ffn(...)``
    decorator, found by reading the files (not by importing them)."""
    import pretrain.models.layers as layers

    found = set()
    for path in Path(layers.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") in ("register_mixer", "register_ffn"):
                        found.add(path.stem)
    return found


def test_every_registering_module_is_listed():
    from pretrain.models import registry

    tree = ast.parse(inspect.getsource(registry._import_layers))
    listed = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    expected = _registering_modules()
    assert {"attention", "gla", "titans", "moe", "mlp"} <= expected  # the scan itself works
    assert listed == expected
