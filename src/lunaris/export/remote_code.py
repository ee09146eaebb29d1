"""The self-contained modeling code of a `trust_remote_code` export (MoC and IRL models).

`modeling_lunaris.py` is assembled from Lunaris's own source at export time, so the exported model is the
trained model, never a re-implementation that could drift from it:
- every module of `lunaris.model` that the model imports (layers, attention, moc, model), whole, in
  dependency order, with their `from lunaris... import` lines removed (the names are defined in the same file);
- from the other Lunaris modules (config, errors) only the definitions those modules import at the top and use,
  found by following the names they reference (an import inside a function, such as the checkpoint reader of
  `model_from_checkpoint`, serves Lunaris alone: it becomes `pass` and nothing of it is embedded);
- then `hf_wrapper.py`: the Hugging Face classes (config adapter, cache adapter, LunarisForCausalLM).
The file imports only torch, transformers and the standard library; `lunaris` need not be installed.
"""

import ast
import importlib.util
from pathlib import Path

from lunaris import __version__
from lunaris.errors import LunarisError

ROOT_MODULE = "lunaris.model.model"
WHOLE_PACKAGE = "lunaris.model."  # modules under here are embedded whole; others only where used
WRAPPER_FILE = Path(__file__).with_name("hf_wrapper.py")
CONFIG_FILE = Path(__file__).with_name("hf_config.py")


class _Module:
    """A module's source, lines and syntax tree (by module name, or from source text)."""

    def __init__(self, name: str, source: str = None):
        if source is None:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise LunarisError(f"cannot find the source of module {name} to embed in the export.")
            source = Path(spec.origin).read_text(encoding="utf-8")
        self.name = name
        self.source = source
        self.lines = self.source.splitlines()
        self.tree = ast.parse(self.source)

    def lunaris_imports(self, top_level_only: bool = False) -> list:
        """[(node, module, [names])] of every `from lunaris... import ...` (nested ones too unless told)."""
        nodes = self.tree.body if top_level_only else ast.walk(self.tree)
        found = []
        for node in nodes:
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "lunaris" for a in node.names):
                raise LunarisError(f"{self.name} line {node.lineno}: write `from lunaris.x import name`, "
                                   f"not `import lunaris.x`, so the export can embed it.")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lunaris":
                found.append((node, node.module, [alias.name for alias in node.names]))
        return found

    def definitions(self) -> dict:
        """Top-level name -> statement that defines it (functions, classes, assignments)."""
        defined = {}
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            defined[name.id] = node
        return defined

    def segment(self, node) -> str:
        """Source lines of a statement, decorators included."""
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(self.lines[first - 1:node.end_lineno])


def _referenced_names(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
           {n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def _imported_module(import_node) -> str:
    if isinstance(import_node, ast.ImportFrom):
        return import_node.module or ""
    return import_node.names[0].name


def _bound_names(import_node) -> set:
    return {(alias.asname or alias.name).split(".")[0] for alias in import_node.names}


def _whole_modules() -> list:
    """lunaris.model modules reachable from the root module, dependencies first."""
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        module = _Module(name)
        imported = [mod for _, mod, _ in module.lunaris_imports(top_level_only=True)]
        lazily = [mod for _, mod, _ in module.lunaris_imports() if mod not in imported]
        for dependency in imported:
            if dependency.startswith(WHOLE_PACKAGE):
                visit(dependency)
        order.append(module)
        for dependency in lazily:  # imported inside functions (moc.py for MoC layers): embed if it exists
            if dependency.startswith(WHOLE_PACKAGE) and importlib.util.find_spec(dependency) is not None:
                visit(dependency)

    visit(ROOT_MODULE)
    return order


def _partial_sections(wanted: dict) -> list:
    """Source of the definitions `wanted` ({module: names}) needs from modules outside lunaris.model.

    Follows references within a module (a class using a helper function) and across modules (config.py
    importing ConfigError from errors.py); a module's library imports are kept where its kept code uses them.
    """
    modules, chosen = {}, {}
    pending = [(module, name) for module, names in wanted.items() for name in names]
    while pending:
        module_name, name = pending.pop()
        module = modules.setdefault(module_name, _Module(module_name))
        chosen.setdefault(module_name, set())
        if name in chosen[module_name]:
            continue
        node = module.definitions().get(name)
        if node is None:
            raise LunarisError(f"{module_name} defines no top-level {name!r} to embed in the export.")
        chosen[module_name].add(name)
        references = _referenced_names(node)
        for other in module.definitions():
            if other in references:
                pending.append((module_name, other))
        for _, source_module, names in module.lunaris_imports(top_level_only=True):
            pending.extend((source_module, n) for n in names if n in references)
    sections = []
    for module_name in _dependency_order(modules):
        module = modules[module_name]
        kept = [node for node in module.tree.body
                if any(module.definitions().get(n) is node for n in chosen[module_name])]
        used = set().union(*(_referenced_names(node) for node in kept))
        imports = [node for node in module.tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                   and _imported_module(node).split(".")[0] not in ("lunaris", "__future__")
                   and _bound_names(node) & used]
        body = "\n".join(module.segment(node) for node in imports) + "\n\n\n"
        body += "\n\n\n".join(_segment_without_nested_imports(module, node) for node in kept)
        sections.append((module_name, body))
    return sections


def _segment_without_nested_imports(module: _Module, node) -> str:
    """A kept definition's source, its nested `from lunaris... import` lines made `pass`: they serve code paths
    of Lunaris itself (e.g. validating training-only keys) that the exported model never runs."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    lines = module.lines[first - 1:node.end_lineno]
    nested = [n for n in ast.walk(node)
              if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "lunaris"]
    for imp in sorted(nested, key=lambda n: -n.lineno):
        text = lines[imp.lineno - first]
        indent = text[:len(text) - len(text.lstrip())]
        removed = f"{indent}pass  # (a lunaris import, removed by the export)"
        lines[imp.lineno - first:imp.end_lineno - first + 1] = [removed]
    return "\n".join(lines)


def _dependency_order(modules: dict) -> list:
    order = []

    def visit(name):
        if name in order:
            return
        for _, dependency, _ in modules[name].lunaris_imports(top_level_only=True):
            if dependency in modules:
                visit(dependency)
        order.append(name)

    for name in modules:
        visit(name)
    return order


def _without_lunaris_imports(module: _Module) -> str:
    """The module's source with every `from lunaris... import` removed (a nested one becomes `pass`)."""
    lines = list(module.lines)
    top_level = {id(node) for node in module.tree.body}
    for node, _, _ in sorted(module.lunaris_imports(), key=lambda item: -item[0].lineno):
        first_line = lines[node.lineno - 1]
        indent = first_line[:len(first_line) - len(first_line.lstrip())]
        replacement = [] if id(node) in top_level else [f"{indent}pass  # (a lunaris import, removed by the export)"]
        lines[node.lineno - 1:node.end_lineno] = replacement
    return "\n".join(line for line in lines if not line.startswith("from __future__"))


def _bindings(body: str) -> dict:
    """Top-level name -> what binds it: ('def',) for definitions, ('import', target) for imports."""
    bound = {}
    for node in ast.parse(body).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound[node.name] = ("def",)
        elif isinstance(node, ast.Assign):
            bound.update({t.id: ("def",) for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                target = f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                bound[(alias.asname or alias.name).split(".")[0]] = ("import", target)
    return bound


def _check_unique(sections: list) -> None:
    """Two embedded modules binding one name to different things would silently shadow one another."""
    owner = {}
    for module_name, body in sections:
        for name, binding in _bindings(body).items():
            if name in owner and owner[name][0] != module_name and (binding == ("def",) or owner[name][1] != binding):
                raise LunarisError(f"cannot assemble the exported modeling file: {name!r} means different things "
                                   f"in {owner[name][0]} and {module_name}; rename one of them.")
            owner.setdefault(name, (module_name, binding))


def modeling_source() -> str:
    """The text of modeling_lunaris.py."""
    whole = _whole_modules()
    wanted: dict = {}
    for module in whole:
        # top-level imports only: one inside a function serves Lunaris alone (model_from_checkpoint reading a
        # checkpoint) and becomes `pass` in the export, so what it names is not embedded
        for _, source_module, names in module.lunaris_imports(top_level_only=True):
            if not source_module.startswith(WHOLE_PACKAGE):
                wanted.setdefault(source_module, set()).update(names)
    # the wrapper (the Hugging Face classes) uses a few Lunaris names as well, e.g. model_config_from_dict
    wrapper = _Module("Hugging Face classes", WRAPPER_FILE.read_text(encoding="utf-8"))
    for _, source_module, names in wrapper.lunaris_imports():
        if not source_module.startswith(WHOLE_PACKAGE):
            wanted.setdefault(source_module, set()).update(names)
    sections = _partial_sections(wanted) + [(m.name, _without_lunaris_imports(m)) for m in whole]
    sections.append((wrapper.name, _without_lunaris_imports(wrapper)))
    _check_unique(sections)
    future = sorted({line for module in whole for line in module.lines if line.startswith("from __future__")})
    header = (f'"""Lunaris model code for Hugging Face `trust_remote_code` (generated by lunaris {__version__}).\n\n'
              f"Assembled from the lunaris source: each section below is a copy of the module it names, with the\n"
              f'imports of lunaris removed (the names are defined in this file). Do not edit; export again.\n"""\n')
    parts = [header, *(line + "\n" for line in future)]
    for module_name, body in sections:
        parts.append(f"\n\n# {'=' * 98}\n# {module_name}\n# {'=' * 98}\n\n{body.strip()}\n")
    return "".join(parts)


def configuration_source() -> str:
    """The text of configuration_lunaris.py (imports only transformers)."""
    return CONFIG_FILE.read_text(encoding="utf-8")
