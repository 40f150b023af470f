"""Tests of the package layout: which parts of jaxcache may import which.

Layers, lowest first: the core (the top-level modules of ``jaxcache`` and every subpackage but
the four below), ``jaxcache.tuning``, ``jaxcache.models``, ``jaxcache.evaluation``,
``jaxcache.digits``. A layer imports only from layers below it; the core imports none of the
four. ``jaxcache.tuning`` (settings fitted to a model: the fitted forecast, TeaCache's
calibration, thresholds for a budget) sits right above the core because it runs the sampler, the
top of the core; evaluation and digits use it. The one exception: the package's ``__init__``
re-exports two tuning functions (``jaxcache.fit_forecast``, ``jaxcache.calibrate_teacache``)
lazily, inside a module ``__getattr__``, so ``import jaxcache`` still loads no outer layer.
Inside the core, only the package's ``__init__`` imports the sampler: no arrow points back up.
Checked on the source with ``ast`` (every import statement, including those inside functions and
``TYPE_CHECKING`` blocks), and on a fresh interpreter's ``sys.modules``.
"""

from __future__ import annotations

import ast
import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxcache"
# Lowest first; each may import only lower ones (and the core).
OUTER = ("tuning", "models", "evaluation", "digits")
PUBLIC = ("jaxcache", "jaxcache.policies", "jaxcache.reuse", "jaxcache.tuning", "jaxcache.models")
FACADE = PACKAGE / "__init__.py"  # may load jaxcache.tuning lazily (module __getattr__)
LAZY_FROM_TUNING = ("calibrate_teacache", "fit_forecast")


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: pathlib.Path, root: pathlib.Path = ROOT) -> set[str]:
    """Every module an import statement in ``path`` names (``from a import b`` names a and a.b)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _files(*, inside: str | None = None) -> list[pathlib.Path]:
    """The package's source files: one subpackage's, or the core's (``inside=None``)."""
    if inside is not None:
        return sorted((PACKAGE / inside).rglob("*.py"))
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in OUTER)


def _violations(
    files: list[pathlib.Path], forbidden: tuple[str, ...], root: pathlib.Path = ROOT
) -> list[str]:
    prefixes = tuple(f"jaxcache.{name}" for name in forbidden)
    bad = []
    for path in files:
        for module in sorted(_imported(path, root)):
            if any(module == p or module.startswith(p + ".") for p in prefixes):
                bad.append(f"{path.relative_to(root)} imports {module}")
    return bad


def test_core_files_are_found():
    core = {str(p.relative_to(PACKAGE)) for p in _files()}
    for expected in ("__init__.py", "sampler.py", "policies/__init__.py", "reuse/__init__.py"):
        assert expected in core
    assert not any(p.split("/")[0] in OUTER for p in core)


def test_core_imports_no_outer_layer():
    core = [p for p in _files() if p != FACADE]
    assert _violations(core, OUTER) == []
    assert _violations([FACADE], OUTER[1:]) == []


def test_the_facade_loads_the_tuning_layer_only_lazily():
    # Its module-level statements import no outer layer; jaxcache.tuning is named only inside
    # functions (the module __getattr__).
    tree = ast.parse(FACADE.read_text())
    top = ast.Module(body=[n for n in tree.body if not isinstance(n, ast.FunctionDef)],
                     type_ignores=[])
    names = {a.name for n in ast.walk(top) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(top) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in names if m.split(".")[1:2] and m.split(".")[1] in OUTER]


def test_only_the_facade_imports_the_sampler_inside_the_core():
    # The sampler is the top of the core: policies, reuse modes, plans and the rest sit below
    # it, and what runs it to fit settings lives in jaxcache.tuning.
    core = [p for p in _files() if p not in (FACADE, PACKAGE / "sampler.py")]
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in core for m in _imported(p)
           if m == "jaxcache.sampler" or m.startswith("jaxcache.sampler.")]
    assert bad == []


def test_tuning_is_built_on_the_sampler_not_a_loop_of_its_own():
    # Every tuning module that samples does so through jaxcache.sample: none writes a loop of
    # network calls (no lax loop primitive in the layer).
    files = _files(inside="tuning")
    loops = ("scan", "fori_loop", "while_loop")
    found = [
        f"{path.relative_to(ROOT)}: {node.attr}"
        for path in files
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in loops
    ]
    assert found == []
    # One place samples: the calibration run (jaxcache.tuning.run), which every fitting
    # function takes.
    assert "jaxcache.sampler" in _imported(PACKAGE / "tuning" / "run.py")
    for name in ("forecast.py", "teacache.py", "threshold.py", "magcache.py", "segments.py",
                 "router.py", "sencache.py"):
        assert "jaxcache.tuning.run" in _imported(PACKAGE / "tuning" / name), name


@pytest.mark.parametrize("index", range(len(OUTER)))
def test_outer_layers_import_only_lower_layers(index):
    layer = OUTER[index]
    assert _files(inside=layer)
    assert _violations(_files(inside=layer), OUTER[index + 1 :]) == []


def test_no_jaxcache_module_imports_flax_linen():
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for module in _imported(path)
        if module == "flax.linen" or module.startswith("flax.linen.")
    ]
    assert bad == []


def test_the_checker_sees_every_import_form(tmp_path):
    # The checker itself: absolute, from-, relative and dynamic imports are all caught.
    sub = tmp_path / "jaxcache" / "reuse"
    sub.mkdir(parents=True)
    (sub / "__init__.py").write_text("")
    source = sub / "mode.py"
    source.write_text(
        "import jaxcache.digits.data\n"
        "from jaxcache import evaluation\n"
        "from ..models import layers\n"
        "def f():\n"
        "    import importlib\n"
        "    return importlib.import_module('jaxcache.digits.quality')\n"
    )
    found = _imported(source, tmp_path)
    bad = _violations([source], OUTER, tmp_path)
    assert {"jaxcache.digits.data", "jaxcache.evaluation", "jaxcache.models.layers"} <= found
    assert "jaxcache.digits.quality" in found
    assert len(bad) == 5  # digits.data, evaluation, models, models.layers, digits.quality


@pytest.mark.parametrize("name", PUBLIC)
def test_public_packages_define_all(name):
    module = importlib.import_module(name)
    assert isinstance(module.__all__, (list, tuple))
    assert len(set(module.__all__)) == len(module.__all__)
    missing = [item for item in module.__all__ if not hasattr(module, item)]
    assert missing == []


def test_importing_jaxcache_loads_no_outer_layer():
    code = (
        "import json, sys\n"
        "import flax\n"
        "before = set(sys.modules)\n"
        "import jaxcache\n"
        "print(json.dumps({'jaxcache': sorted(m for m in sys.modules if m.startswith('jaxcache')),"
        " 'new': sorted(set(sys.modules) - before)}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "jaxcache.sampler" in loaded["jaxcache"]
    outer = [m for m in loaded["jaxcache"] if m.split(".")[1:2] and m.split(".")[1] in OUTER]
    assert outer == []
    # ``import flax`` itself imports flax.linen (flax/__init__.py); jaxcache must add none of it.
    assert [m for m in loaded["new"] if m == "flax.linen" or m.startswith("flax.linen.")] == []


def test_the_tuning_functions_load_on_first_use():
    names = repr(LAZY_FROM_TUNING)
    code = (
        "import json, sys\n"
        "import jaxcache\n"
        "before = sorted(m for m in sys.modules if m.startswith('jaxcache.tuning'))\n"
        "from jaxcache import fit_forecast\n"
        "import jaxcache.tuning\n"
        "print(json.dumps({'before': before,\n"
        f"    'same': [getattr(jaxcache, n) is getattr(jaxcache.tuning, n) for n in {names}],\n"
        f"    'listed': [n in dir(jaxcache) for n in {names}]}}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"before": [], "same": [True, True], "listed": [True, True]}
    assert set(LAZY_FROM_TUNING) <= set(importlib.import_module("jaxcache").__all__)
