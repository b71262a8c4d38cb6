"""Which part of seg-rt may import which, enforced by parsing every source file's imports with ``ast``.

The parts are the folders mapped into ``seg_rt`` by pyproject's ``[tool.setuptools.package-dir]``
(docs/design.md, "Layout"):

- ``core`` (``seg_rt/``: blur, attention, guidance, sampler, pipeline, families, demo, the CLI
  ``seg_rt.cli``, the benchmarks ``seg_rt.bench``) imports no other part at module level; the CLI
  and benchmarks import them inside the function that needs them.
- ``engines`` and ``export`` use the core only (and not each other, nor video / cluster).
- ``video`` uses the core, engines and export; ``cluster`` may use every part.
- Outside ``cluster`` (Ray / FastAPI / pydantic are what it is made of), no optional heavy
  dependency (``seg_rt.optional.EXTRAS``: onnxruntime, tensorrt, ray, cv2, ...) is imported at
  module level: it is imported where used, through ``seg_rt.optional.require``.
- No part imports another part's ``_private`` names or modules.
- The reference blur (``seg_rt.bench.reference``, the tests' oracle) imports nothing from seg_rt.
- The core's own modules import each other without cycles (the demo model never imports the
  sampling code that loads it); so do the cluster's: the HTTP API mappings (``openai_api``,
  ``a1111_api``) import the request module only, never the serving core or the app.
- ``seg_rt.cluster`` and its sub-packages import with none of the ``[cluster]`` extra installed
  (their ``__init__`` files import nothing).

Violations in files owned by other work in flight are listed in ``KNOWN`` and marked ``xfail``
(strict: once fixed, the test fails until the entry is removed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from seg_rt.optional import EXTRAS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - py3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# part name of each folder mapped into seg_rt; seg_rt itself (and seg_rt.demo) is the core
PARTS = {pkg: pkg.removeprefix("seg_rt.") if pkg != "seg_rt" else "core" for pkg in PACKAGE_DIRS}
MAY_IMPORT = {
    "core": {"core"},
    "engines": {"core", "engines"},
    "export": {"core", "export"},
    "video": {"core", "engines", "export", "video"},
    "cluster": {"core", "engines", "export", "video", "cluster"},
}
# optional dependencies that must not load when their part is merely imported
HEAVY = set(EXTRAS) | {"pydantic", "starlette", "uvicorn", "tensorrt_libs"}
HEAVY_ALLOWED_PARTS = {"cluster"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    target: str  # dotted module imported from
    names: tuple[str, ...]  # names imported from it ("" for ``import x``)
    line: int
    lazy: bool  # inside a function: runs only when called


def source_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of every part."""
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [*pkg.split("."), *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


FILES = source_files()


def part_of(module: str) -> str | None:
    """The part a dotted module belongs to (longest mapped package prefix); None if not seg-rt."""
    best = None
    for pkg in PARTS:
        if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best)):
            best = pkg
    return PARTS[best] if best else None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str) -> list[Import]:
    path = FILES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, ("",), child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in FILES:  # ``from . import data``: the submodule itself
                        found.append(Import(module, sub, ("",), child.lineno, lazy))
                    else:
                        found.append(Import(module, base, (alias.name,), child.lineno, lazy))
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, False)
    return found


def _private(imp: Import) -> bool:
    segments = imp.target.split(".")[1:] + [n for n in imp.names if n]
    return any(s.startswith("_") and not (s.startswith("__") and s.endswith("__")) for s in segments)


def violations(module: str) -> list[str]:
    """Every boundary rule ``module`` breaks, one line each (file:line: what)."""
    part = part_of(module)
    where = FILES[module].relative_to(ROOT)
    out = []
    for imp in imports_of(module):
        target_part = part_of(imp.target)
        at = f"{where}:{imp.line}"
        if target_part is None:
            top = imp.target.split(".")[0]
            if top in HEAVY and not imp.lazy and part not in HEAVY_ALLOWED_PARTS:
                out.append(f"{at}: imports optional dependency {top} at module level")
            continue
        if target_part not in MAY_IMPORT[part] and not (imp.lazy and lazy_reason(module, target_part)):
            how = "lazily " if imp.lazy else ""
            out.append(f"{at}: {part} {how}imports {target_part} ({imp.target})")
        if target_part != part and _private(imp):
            names = ", ".join(n for n in imp.names if n) or imp.target
            out.append(f"{at}: {part} imports private {names} from {target_part} ({imp.target})")
    return out


# The imports against the direction of the parts that are allowed, each inside the function that
# needs it (never at module level) and each with its reason: (importing module or package, part).
_CLI = "the CLI fronts every part: a sub-command imports the part it runs when it runs"
LAZY_ALLOWED: dict[tuple[str, str], str] = {
    ("seg_rt.cli", "export"): _CLI,
    ("seg_rt.cli", "video"): _CLI,
    ("seg_rt.cli", "cluster"): _CLI,
    ("seg_rt.bench", "engines"): "a benchmark times the engines it names",
    ("seg_rt.bench", "export"): "the engines benchmark exports the model it times",
    ("seg_rt.families.unet", "engines"): "a family builds its torch denoiser (TorchDenoiser)",
    ("seg_rt.families.dit", "engines"): "a family builds its torch denoiser (DiTDenoiser)",
    ("seg_rt", "video"): "seg_rt.generate_video, the package's video entry point, runs the video part",
    ("seg_rt.families.registry", "video"): "the video families register themselves on the first lookup",
    ("seg_rt.models", "engines"): "open_model loads the engine a caller names",
    ("seg_rt.models", "cluster"): "a model URL is fetched by object storage (seg_rt.cluster.storage)",
    ("seg_rt.pipeline", "engines"): "run_params opens the torch denoiser and the local branch ranks",
    ("seg_rt.pipeline", "cluster"): "branch-parallel ranks as Ray actors (launcher 'ray')",
}


def lazy_reason(module: str, target_part: str) -> str | None:
    """Why ``module`` may import ``target_part`` inside a function (``LAZY_ALLOWED``), or None."""
    for (where, part), reason in LAZY_ALLOWED.items():
        if part == target_part and (module == where or module.startswith(where + ".")):
            return reason
    return None


def test_every_allowed_lazy_import_is_still_used():
    """An entry of ``LAZY_ALLOWED`` that no import needs any more is stale: delete it."""
    used = set()
    for module in FILES:
        for imp in imports_of(module):
            target = part_of(imp.target)
            if imp.lazy and target is not None and target not in MAY_IMPORT[part_of(module)]:
                used |= {
                    (w, p)
                    for w, p in LAZY_ALLOWED
                    if p == target and (module == w or module.startswith(w + "."))
                }
    assert set(LAZY_ALLOWED) - used == set()


# file (relative to the repository root) -> why it still breaks a rule; fix the file, then delete
KNOWN: dict[str, str] = {}


def _params() -> list:
    out = []
    for module, path in FILES.items():
        rel = str(path.relative_to(ROOT))
        marks = [pytest.mark.xfail(reason=f"{rel}: {KNOWN[rel]}", strict=True)] if rel in KNOWN else []
        out.append(pytest.param(module, id=rel, marks=marks))
    return out


@pytest.mark.parametrize("module", _params())
def test_imports_respect_part_boundaries(module):
    assert violations(module) == []


def _part_graph(part: str) -> dict[str, set[str]]:
    """Module of ``part`` → modules of ``part`` it imports at any depth of its code (lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for module in FILES:
        if part_of(module) != part:
            continue
        targets = {i.target for i in imports_of(module)}
        graph[module] = {t for t in targets if t in FILES and part_of(t) == part and t != module}
    return graph


def _core_graph() -> dict[str, set[str]]:
    return _part_graph("core")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_core_modules_import_each_other_without_cycles():
    graph = _core_graph()
    graph.pop("seg_rt", None)  # the package re-exports the public API; importing it is not a cycle
    for deps in graph.values():
        deps.discard("seg_rt")
    assert _cycle(graph) is None


def test_demo_model_does_not_import_the_sampling_code():
    targets = {i.target for i in imports_of("seg_rt.demo.model")}
    assert not targets & {"seg_rt.pipeline", "seg_rt.sampler", "seg_rt", "seg_rt.families"}


def test_reference_blur_imports_nothing_from_seg_rt():
    """``tests/reference_seg.py`` and ``tests/test_blur.py`` take their oracle from here: it must share
    no code with what they test (no seg_rt import at any depth of the module, lazy ones included)."""
    imported = {i.target for i in imports_of("seg_rt.bench.reference")}
    assert imported and {t.split(".")[0] for t in imported} <= {"math", "torch"}, imported


def test_the_checker_finds_what_it_forbids(tmp_path, monkeypatch):
    """The rules can fail: a core module importing onnxruntime and a cluster module at module
    level or the export part inside a function (not an allowed lazy import), and a video module
    importing an engine's private name, are all reported."""
    core = tmp_path / "bad_core.py"
    core.write_text(
        "import onnxruntime\nfrom seg_rt.cluster.jobs.spec import JobSpec\n\ndef f():\n    import ray\n"
        "    from seg_rt.export.onnx import export_onnx\n"
    )
    video = tmp_path / "bad_video.py"
    video.write_text("from seg_rt.engines.base import _fmt\nfrom seg_rt.cluster.jobs import spec\n")
    monkeypatch.setitem(FILES, "seg_rt.bad_core", core)
    monkeypatch.setitem(FILES, "seg_rt.video.bad_video", video)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("seg_rt.bad_core") == [
        "bad_core.py:1: imports optional dependency onnxruntime at module level",
        "bad_core.py:2: core imports cluster (seg_rt.cluster.jobs.spec)",
        "bad_core.py:6: core lazily imports export (seg_rt.export.onnx)",  # not in LAZY_ALLOWED
    ]
    assert violations("seg_rt.video.bad_video") == [
        "bad_video.py:1: video imports private _fmt from engines (seg_rt.engines.base)",
        "bad_video.py:2: video imports cluster (seg_rt.cluster.jobs.spec)",
    ]


def test_cycle_finder_reports_the_old_demo_pipeline_cycle():
    graph = {"seg_rt.pipeline": {"seg_rt.demo.model"}, "seg_rt.demo.model": {"seg_rt.pipeline"}}
    assert _cycle(graph) == ["seg_rt.demo.model", "seg_rt.pipeline", "seg_rt.demo.model"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_cluster_modules_import_each_other_without_cycles():
    assert _cycle(_part_graph("cluster")) is None


API_MODULES = ("seg_rt.cluster.serving.openai_api", "seg_rt.cluster.serving.a1111_api")


@pytest.mark.parametrize("module", API_MODULES)
def test_api_mappings_import_only_the_request_module(module):
    """An API module maps its fields onto the request: it builds on ``serving.request`` only, so the
    app (which imports the API modules) and the core never sit in a cycle with it."""
    cluster = {i.target for i in imports_of(module) if part_of(i.target) == "cluster"}
    assert cluster == {"seg_rt.cluster.serving.request"}


BLOCKED_EXTRA = ("pydantic", "fastapi", "starlette", "ray", "prometheus_client", "yaml", "uvicorn")
REFUSE_EXTRA = f"""
import sys
BLOCKED = set({BLOCKED_EXTRA!r})

class Refuse:  # as if the [cluster] extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
"""


def test_cluster_packages_import_without_the_cluster_extra():
    """``import seg_rt.cluster`` (and ``.jobs``, ``.serving``) on a core-only install: nothing from
    the ``[cluster]`` extra loads; the job spec, which needs pydantic, is refused by the same finder
    (so the finder does block)."""
    code = REFUSE_EXTRA + (
        "import seg_rt.cluster, seg_rt.cluster.jobs, seg_rt.cluster.serving\n"
        "loaded = sorted({m.partition('.')[0] for m in sys.modules} & BLOCKED)\n"
        "assert not loaded, loaded\n"
        "try:\n"
        "    import seg_rt.cluster.jobs.spec\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('refused', exc.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["refused", "pydantic"]
