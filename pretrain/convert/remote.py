"""Remote-code export: our own model code, bundled into the Hugging Face folder, for the
families transformers has no class for (``AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)``).

The code is generated at export time from the trainer's own source, never kept as a second
copy: :func:`bundle` starts at pretrain/convert/hf_modeling.py and copies every module it
reaches in ``pretrain`` and ``kernels`` as one flat file (``kernels.gla.chunk_torch`` ->
``kernels_gla_chunk_torch.py``), rewriting only the import statements (found with ``ast``):

* an import of one of our modules becomes the relative import of its flat file, ``from .flat
  import X`` (transformers' dynamic-module loader copies exactly the files that such lines name;
  see ``transformers.dynamic_module_utils.get_relative_imports``). A module imported as an
  object (``from kernels.gla import chunk_torch``) becomes ``from . import flat as chunk_torch``,
  preceded by a ``from .flat import __name__ as ...`` line that the loader can see;
* imports under ``if TYPE_CHECKING:`` become ``pass`` (annotations are strings here);
* an import inside a function or a ``try`` of a package outside torch, transformers and the
  standard library (triton, flash_attn), or of one of our modules that needs one (the Triton
  kernels), becomes ``raise ImportError(...)``: the bundled model never takes those paths,
  because the bundled :func:`kernels.dispatch.select` always answers 'torch' (an override is
  appended to that file) and flash-attn counts as absent;
* anything else (such an import at module level, a module that does not exist) fails the
  export with :class:`BundleError`, one line naming the module.

Everything else in each file is kept verbatim.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.convert.families import ConvertError

ENTRY = "pretrain.convert.hf_modeling"
"""The module whose closure is bundled; written as :data:`ENTRY_FILE`."""
ENTRY_FILE = "modeling_pretrain"
"""The entry's flat name in the folder (config.json ``auto_map`` points into it)."""
BUNDLED_PACKAGES = ("pretrain", "kernels")
"""Top-level packages whose modules are copied into the folder."""
ALLOWED_PACKAGES = frozenset({"torch", "transformers"})
"""Third-party packages the bundled code may import (besides the standard library)."""

_DISPATCH = "kernels.dispatch"
_DISPATCH_OVERRIDE = '''

# Appended by the remote-code export (pretrain/convert/remote.py): this folder holds no Triton
# kernels, so every op takes its PyTorch implementation, whatever model.kernels or the
# environment say.
def select(op: str, backend: str, device: torch.device, module: str | None) -> str:
    """Always 'torch' in an exported folder."""
    return "torch"
'''


class BundleError(ConvertError):
    """A module of the model's import closure that cannot be bundled (one line, naming it)."""


class _Unbundleable(Exception):
    """A module that needs a package outside :data:`ALLOWED_PACKAGES` at import time (the
    Triton kernels): fine to drop when imported lazily, an error at module level."""

    def __init__(self, module: str, package: str) -> None:
        super().__init__(f"{module} needs the {package} package")
        self.module, self.package = module, package


def flat_name(module: str) -> str:
    """The bundled file name (without .py) of the dotted ``module``."""
    return ENTRY_FILE if module == ENTRY else module.replace(".", "_")


def _source_file(module: str) -> Path | None:
    """The .py file of ``module`` (a package's __init__.py), or None when there is none."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_stdlib(top: str) -> bool:
    return top in sys.stdlib_module_names or top == "__future__"


@dataclass
class _Site:
    """Where an import statement sits: inside a def or try (lazy), or under TYPE_CHECKING."""

    lazy: bool = False
    type_checking: bool = False


@dataclass
class _Bundler:
    files: dict[str, str] = field(default_factory=dict)  # module -> rewritten source
    failed: dict[str, _Unbundleable] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)

    def add(self, module: str, importer: str) -> None:
        """Bundle ``module`` and its closure. Raises _Unbundleable or BundleError."""
        if module in self.files or module in self.active:
            return
        if module in self.failed:
            raise self.failed[module]
        path = _source_file(module)
        if path is None:
            raise BundleError(f"remote-code export: module {module} (imported by {importer}) cannot be found")
        self.active.add(module)
        try:
            self.files[module] = self._rewrite(module, path)
        except _Unbundleable as exc:
            self.failed[module] = exc
            raise
        finally:
            self.active.discard(module)

    def _rewrite(self, module: str, path: Path) -> str:
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines(keepends=True)
        is_package = path.name == "__init__.py"
        edits: list[tuple[ast.stmt, str]] = []
        for node, site in _imports(ast.parse(source, str(path))):
            text = self._replacement(module, is_package, node, site, " " * node.col_offset)
            if text is not None:
                edits.append((node, text))
        # replace whole statements, last first, so earlier line numbers stay valid
        for node, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
            start, end = node.lineno - 1, node.end_lineno - 1
            head = lines[start][: node.col_offset]
            tail = lines[end][node.end_col_offset :]
            lines[start : end + 1] = [head + text.lstrip(" ") + tail]
        text = "".join(lines)
        if module == _DISPATCH:
            text += _DISPATCH_OVERRIDE
        return text

    def _replacement(self, module: str, is_package: bool, node: ast.stmt, site: _Site, indent: str) -> str | None:
        """The text replacing the import ``node`` of ``module``, or None to keep it as it is."""
        if site.type_checking:
            return "pass"
        if isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            targets = [(base, alias.name, alias.asname) for alias in node.names]
        else:
            targets = [(alias.name, None, alias.asname) for alias in node.names]
        top = (targets[0][0] or "").split(".")[0]
        if _is_stdlib(top) or top in ALLOWED_PACKAGES:
            return None
        if top not in BUNDLED_PACKAGES:
            if site.lazy:
                return f'raise ImportError("{top} is not part of this exported folder")'
            raise _Unbundleable(module, top)
        try:
            return self._relative(module, targets, indent)
        except _Unbundleable as exc:
            if site.lazy:
                return f'raise ImportError("{exc.module}: {exc.package} kernels are not part of this exported folder")'
            raise

    def _relative(self, importer: str, targets: list, indent: str) -> str:
        """The relative imports of the bundled flat files that ``targets`` name."""
        out: list[str] = []
        names: list[str] = []
        for base, name, asname in targets:
            if name is None:  # `import a.b as c`
                if asname is None:
                    raise BundleError(f"remote-code export: {importer}: `import {base}` binds a package; use `from ... import`")
                out += self._module_lines(base, asname, importer)
            elif name == "*":
                raise BundleError(f"remote-code export: {importer}: `from {base} import *` cannot be bundled")
            elif _is_submodule(base, name):
                out += self._module_lines(f"{base}.{name}", asname or name, importer)
            else:
                names.append(name if asname is None else f"{name} as {asname}")
                self.add(base, importer)
        if names:
            out.insert(0, f"from .{flat_name(targets[0][0])} import {', '.join(names)}")
        return ("\n" + indent).join(out)

    def _module_lines(self, module: str, alias: str, importer: str) -> list[str]:
        self.add(module, importer)
        flat = flat_name(module)
        # the first line only makes transformers copy the file; the second binds the module
        return [f"from .{flat} import __name__ as _{flat}_name", f"from . import {flat} as {alias}"]


def _is_submodule(package: str, name: str) -> bool:
    """Whether ``package.name`` is a module file or subpackage (not an attribute of the package)."""
    pkg = _source_file(package)
    return pkg is not None and pkg.name == "__init__.py" and (
        (pkg.parent / f"{name}.py").is_file() or (pkg.parent / name / "__init__.py").is_file()
    )


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    base = ".".join(parts[:keep])
    return f"{base}.{node.module}" if node.module else base


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, _Site]]:
    """Every import statement of ``tree`` with where it sits."""
    found: list[tuple[ast.stmt, _Site]] = []

    def visit(node: ast.AST, site: _Site) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, site))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try)):
                visit(child, _Site(lazy=True, type_checking=site.type_checking))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, _Site(lazy=site.lazy, type_checking=True))
                for stmt in child.orelse:
                    visit_stmt(stmt, site)
            else:
                visit(child, site)

    def visit_stmt(stmt: ast.stmt, site: _Site) -> None:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            found.append((stmt, site))
        else:
            visit(stmt, site)

    visit(tree, _Site())
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def bundle(entry: str | None = None) -> dict[str, str]:
    """The import closure of ``entry`` (None: :data:`ENTRY`) within :data:`BUNDLED_PACKAGES`: ``{file name: source}``
    (file names ``<flat name>.py``; the entry is ``modeling_pretrain.py``).

    Raises :class:`BundleError` (one line naming the module) for a module that cannot be
    found, or a module-level import of a package outside torch, transformers and the standard
    library (directly or through one of our modules)."""
    entry = entry or ENTRY
    bundler = _Bundler()
    try:
        bundler.add(entry, "the export")
    except _Unbundleable as exc:
        raise BundleError(f"remote-code export: {exc.module} needs the {exc.package} package at import time") from None
    return {f"{ENTRY_FILE if m == entry else flat_name(m)}.py": src for m, src in bundler.files.items()}


REMOTE_FAMILY = "remote"
"""The family name :func:`pretrain.convert.export_hf` returns for a remote-code export."""
REMOTE_CLASS = "PretrainHybridForCausalLM"
"""config.json ``architectures`` of a remote-code export (pretrain/convert/hf_modeling.py)."""


def build_remote_model(model_cfg, state: dict, eos_id: int, max_positions: int):
    """The in-process :class:`~pretrain.convert.hf_modeling.PretrainHybridForCausalLM` holding
    ``state`` (a ``HybridLM`` state_dict of ``model_cfg``, a ModelConfig), in eval mode, with
    the config and generation config the export writes (``auto_map`` into
    ``modeling_pretrain.py``; the PyTorch paths: ``kernels = 'torch'``, SDPA attention).
    Raises ConvertError when ``state`` does not fit the model."""
    import dataclasses

    import torch
    from transformers import GenerationConfig

    from pretrain.convert.hf_modeling import PretrainHybridConfig, PretrainHybridForCausalLM

    model_dict = dataclasses.asdict(model_cfg)
    model_dict["kernels"] = "torch"
    model_dict["attention"]["backend"] = "sdpa"
    config = PretrainHybridConfig(
        pretrain_model=model_dict,
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.d_model,
        num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.attention.n_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=model_cfg.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        initializer_range=model_cfg.init_std,
        architectures=[REMOTE_CLASS],
        auto_map={
            "AutoConfig": f"{ENTRY_FILE}.PretrainHybridConfig",
            "AutoModelForCausalLM": f"{ENTRY_FILE}.{REMOTE_CLASS}",
        },
    )
    with torch.device("meta"):  # the weights come from state: no initialisation
        model = PretrainHybridForCausalLM(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConvertError(f"remote-code export: the checkpoint does not fit its config ({first})") from None
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, use_cache=True)
    return model.eval()


def write_remote_files(folder: Path, files: dict[str, str]) -> None:
    """Write :func:`bundle`'s files into ``folder``."""
    for name, text in files.items():
        (Path(folder) / name).write_text(text, encoding="utf-8")
