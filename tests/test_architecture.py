"""The layout's rules, checked on the source: stages depend only on earlier stages, through their front doors,
without import cycles and without importing another module's private names; and the command line starts without
loading torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from histotransfer.cli import COMMANDS

SRC = Path(__file__).resolve().parents[1] / "src" / "histotransfer"
# The pipeline's order: a stage may use the stages before it, never those after it.
STAGES = ["slide", "patches", "stain", "encoders", "features", "mil", "finetune", "analysis", "study"]
# Modules that every stage may use (no stage of their own).
BASE = {"errors", "_io", "_lazy", "provenance", "settings", "runtime", "formats", "batch", "__init__"}
# No module is longer than this; one longer than LONG is named, with the one job that needs its length, in the
# "Long modules" section of docs/architecture.md.
MAX_LINES = 850
LONG = 500
ARCHITECTURE_DOC = SRC.parents[1] / "docs" / "architecture.md"


def module_lines() -> dict[str, int]:
    """Lines of every module of the package, by its path below ``src/histotransfer``."""
    return {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in sorted(SRC.rglob("*.py"))}


def type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the imports made only for type checkers (inside ``if TYPE_CHECKING:``)."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return guarded


def imports(with_type_checking: bool = True) -> list[tuple[str, str, list[str], bool]]:
    """(importing module, imported module, names, at module level) for every relative import of the package,
    wherever it is made (module level or inside a function); imports under ``if TYPE_CHECKING:`` only when
    ``with_type_checking``."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        module = ".".join(rel.parts)
        package = rel.parts[:-1]
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        skip = set() if with_type_checking else type_checking_only(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and id(node) not in skip:
                base = list(package[: len(package) - (node.level - 1)]) if node.level > 1 else list(package)
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                found.append((module, target, [a.name for a in node.names], id(node) in top))
    return found


def stage_of(module: str) -> str | None:
    head = module.split(".")[0]
    return head if head in STAGES else None


def test_stages_use_only_earlier_stages_and_only_their_front_doors():
    problems = []
    for module, target, names, _ in imports():
        own, other = stage_of(module), stage_of(target)
        if other is None or other == own:
            continue
        if own is not None and STAGES.index(other) > STAGES.index(own):
            problems.append(f"{module} imports the later stage {target}")
        parts = target.split(".")
        if len(parts) > 1 and parts[1] != "settings":
            problems.append(f"{module} imports {target} ({', '.join(names)}): use the front door {parts[0]}")
    assert problems == []


def test_every_package_of_the_source_tree_is_a_stage_or_named_here():
    """A new package joins the pipeline's order (and so the front-door and cycle rules) or is named as outside it."""
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert packages - set(STAGES) == {"info"}


def test_no_module_is_too_long_and_each_long_one_is_explained():
    lines = module_lines()
    too_long = [f"{path}: {n} lines" for path, n in lines.items() if n > MAX_LINES]
    assert too_long == [], f"split these modules by job (at most {MAX_LINES} lines)"
    text = ARCHITECTURE_DOC.read_text()
    section = text.split("## Long modules", 1)[1].split("\n## ", 1)[0] if "## Long modules" in text else ""
    unexplained = [f"{path}: {n} lines" for path, n in lines.items() if n > LONG and f"`{path}`" not in section]
    assert unexplained == [], "name these in docs/architecture.md's 'Long modules' with the job that needs it"


def test_no_import_cycles():
    """No module imports itself through others, counting imports inside functions too (they run as soon as the
    function does); only imports made for type checkers alone are left out, as they never run."""
    graph: dict[str, set[str]] = {}
    modules = {".".join(p.relative_to(SRC).with_suffix("").parts) for p in SRC.rglob("*.py")}
    for module, target, names, _ in imports(with_type_checking=False):
        for name in names:  # `from .pkg import module` imports the module itself
            candidate = f"{target}.{name}" if target else name
            edge = candidate if candidate in modules else target if target in modules else f"{target}.__init__"
            if edge in modules and edge != module:
                graph.setdefault(module, set()).add(edge)

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif state.get(nxt) is None:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    """A name with a leading underscore belongs to its module: another module that needs it gets it made public
    there, or takes the code along. Dunder names (``__version__``) are public."""
    private = [
        f"{module} imports {name} from {target or 'histotransfer'}"
        for module, target, names, _ in imports()
        for name in names
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    ]
    assert private == []


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([command, "--help"] for command in COMMANDS)])
def test_help_and_version_do_not_import_torch(args):
    code = (
        "import sys; from histotransfer.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_export_is_named_like_a_submodule_of_its_package():
    """Importing ``pkg.name`` sets the package attribute ``name`` to the submodule, which would replace an
    exported function of that name (``from pkg import name`` would then give the module)."""
    import importlib

    clashes = []
    for init in sorted(SRC.rglob("__init__.py")):
        rel = init.parent.relative_to(SRC.parent)
        package = importlib.import_module(".".join(rel.parts))
        submodules = {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
        submodules |= {p.name for p in init.parent.iterdir() if (p / "__init__.py").is_file()}
        exported = set(getattr(package, "__all__", ()))
        clashes += [f"{package.__name__}.{name}" for name in sorted(exported & submodules)]
    assert clashes == []


def test_opening_a_slide_imports_neither_pandas_nor_tqdm_nor_torch(make_slide):
    path = make_slide("light", size=(256, 256))
    code = (
        "import sys; from histotransfer.slide import open_slide\n"
        f"open_slide({str(path)!r}).close()\n"
        "heavy = sorted(m for m in ('pandas', 'tqdm', 'torch') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
