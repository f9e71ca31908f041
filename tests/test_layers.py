"""The import layers (README, Layout): each floor imports only the floors below it.

    examples/                    4  uses pipelines and serve together
    pipelines/  serve/  bench/   3  never import each other (pipelines <-> serve)
    experiments/                 3  research scripts on pipelines and mlops, never serve
    mlops/                       2  shared by training, evaluation and serving
    minillava/                   2  the mini-LLaVA builder: mlops may call it, it never imports mlops
    autoselect/                  1  torch + transformers only

Inside pipelines/, the stage packages (preprocessing/, training/, evaluation/, align/, corpora/)
never import an entry script (pipelines/train.py, evaluate.py, ...): a script is what a user
runs, its stage's library lives in the package. And no module touches ``sys.path``: the package
is installed.

Checked on the source with `ast` (imports inside functions too), so a violation fails here, with
its file:line, before it ever ships.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("autoselect", "minillava", "mlops", "pipelines", "serve", "bench", "experiments", "examples")
FORBIDDEN = {  # top-level package -> top-level names it must not import
    "autoselect": {"ray", "mlflow", "boto3", "fastapi", "deepspeed", "peft", "minillava", "mlops", "pipelines", "serve", "examples"},
    # the builder merges the LM LoRA itself (no PEFT) and is called by mlops, so never the reverse
    "minillava": {"ray", "mlflow", "boto3", "fastapi", "deepspeed", "peft", "mlops", "pipelines", "serve", "bench", "experiments", "examples"},
    "mlops": {"pipelines", "serve", "examples"},
    "pipelines": {"serve", "examples"},
    "serve": {"pipelines", "examples"},
    "bench": {"experiments", "examples"},
    "experiments": {"serve", "bench", "examples"},
    "examples": set(),
}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` for every import in ``path``: ``import``, ``from``
    (relative ones resolved), and ``importlib.import_module`` / ``__import__`` of a literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = list(path.relative_to(root).parent.parts)  # what `from .` means in this file
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                if node.module:
                    found.append((node.lineno, ".".join(base + [node.module])))
                else:
                    found += [(node.lineno, ".".join(base + [alias.name])) for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def layer_violations(root: Path = ROOT) -> list[str]:
    problems = []
    for floor in FLOORS:
        for path in sorted((root / floor).rglob("*.py")):
            for line, module in imported_modules(path, root):
                top = module.split(".")[0]
                if top in FORBIDDEN[floor]:
                    problems.append(f"{path.relative_to(root)}:{line}: {floor}/ imports {module}")
    return problems


def stage_violations(root: Path = ROOT) -> list[str]:
    """Imports of an entry script (``pipelines/<script>.py``) from inside a stage package."""
    scripts = {f"pipelines.{p.stem}" for p in (root / "pipelines").glob("*.py") if p.stem != "__init__"}
    problems = []
    for path in sorted((root / "pipelines").glob("*/**/*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        named = [(node.lineno, f"{node.module}.{alias.name}") for node in ast.walk(tree)  # from pipelines import train
                 if isinstance(node, ast.ImportFrom) and not node.level and node.module for alias in node.names]
        found = {}  # one problem per line (``from pipelines.evaluate import x`` names both)
        for line, module in sorted(imported_modules(path, root) + named):
            script = next((s for s in scripts if module == s or module.startswith(s + ".")), None)
            if script:
                found.setdefault(line, f"{path.relative_to(root)}:{line}: a stage package imports the entry script {script}")
        problems += found.values()
    return problems


def sys_path_patches(root: Path = ROOT) -> list[str]:
    """Every use of ``sys.path`` outside tests/ (the package is installed; bench/gpu_check.sh sets
    PYTHONPATH for the one machine where it is not)."""
    problems = []
    for floor in FLOORS:
        for path in sorted((root / floor).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            problems += [f"{path.relative_to(root)}:{node.lineno}: sys.path" for node in ast.walk(tree)
                         if isinstance(node, ast.Attribute) and node.attr == "path"
                         and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    return problems


def test_stage_packages_never_import_entry_scripts_and_nothing_patches_sys_path():
    problems = stage_violations() + sys_path_patches()
    assert not problems, "pipelines layout broken (see README, Layout):\n  " + "\n  ".join(problems)


def test_the_stage_checks_see_every_form(tmp_path):
    (tmp_path / "pipelines" / "evaluation").mkdir(parents=True)
    (tmp_path / "pipelines" / "train.py").write_text("")
    (tmp_path / "pipelines" / "evaluate.py").write_text("")
    (tmp_path / "pipelines" / "evaluation" / "bad.py").write_text(
        "from pipelines.evaluate import parse_budget\n"
        "from pipelines import train\n"
        "def f():\n    import pipelines.evaluate\n"
        "from pipelines.training import config\nfrom pipelines.evaluation import report\n"
        "from .. import evaluate\n"
    )
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "script.py").write_text("import sys\nsys.path.insert(0, '.')\nprint(sys.argv)\n")
    for floor in FLOORS:
        (tmp_path / floor).mkdir(exist_ok=True)
    assert [problem.split(":")[1] for problem in stage_violations(tmp_path)] == ["1", "2", "4", "7"]
    assert sys_path_patches(tmp_path) == ["experiments/script.py:2: sys.path"]


def test_each_floor_imports_only_the_floors_below():
    problems = layer_violations()
    assert not problems, "import layers broken (see README, Layout):\n  " + "\n  ".join(problems)


def test_the_layer_check_sees_every_import_form(tmp_path):
    """A checker that misses a form would pass silently: plant each form and expect each caught."""
    (tmp_path / "serve" / "sub").mkdir(parents=True)
    (tmp_path / "serve" / "sub" / "bad.py").write_text(
        "import pipelines.train\n"
        "from pipelines import registry\n"
        "def f():\n    from pipelines.training.config import TrainConfig\n"
        "import importlib\nimportlib.import_module('pipelines.promote')\n"
        "from . import fine\nfrom mlops import backbone\n"
    )
    for floor in FLOORS:
        (tmp_path / floor).mkdir(exist_ok=True)
    lines = [problem.split(":")[1] for problem in layer_violations(tmp_path)]
    assert lines == ["1", "2", "4", "6"]


# ---- the one scorer loader ---------------------------------------------------------------
class _Version:
    """What `mlops.registry.resolve_version` returns, as far as the loaders read it."""

    name, version, run_id = "tiny-scorer", "3", "run-1"


@pytest.fixture()
def registered(tmp_path, monkeypatch):
    """A tiny VLM, and a 'registry' whose download returns a saved scorer that ``spoil`` can break."""
    from autoselect import AutoSelectConfig, AutoSelectModel
    from autoselect.testing import build_tiny_llava
    from mlops import registry

    vlm = build_tiny_llava(seed=0)[0]
    folder = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).save_pretrained(tmp_path / "scorer")
    monkeypatch.setattr(registry, "download_autoselect", lambda uri, dst=None: Path(folder))

    def spoil() -> str:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        name = next(k for k in weights if k.startswith("scorer."))
        weights[name] = torch.full_like(weights[name], float("inf"))
        save_file(weights, folder / "model.safetensors")
        return name

    return vlm, spoil


def test_serve_loads_scorers_with_the_shared_loader():
    from mlops import backbone
    from serve import engine

    assert engine.load_registered is backbone.load_registered
    assert "from_pretrained" not in inspect.getsource(engine), "serve/engine.py loads weights itself again"


def test_the_shared_loader_refuses_a_diverged_registered_scorer(registered):
    from mlops.backbone import load_registered
    from serve.engine import load_scorer

    vlm, spoil = registered
    scorer = load_scorer("models:/tiny-scorer@champion", vlm, _Version())
    assert (scorer.version, scorer.alias, scorer.run_id) == ("3", "champion", "run-1") and not scorer.model.training
    name = spoil()
    with pytest.raises(ValueError, match=f"models:/tiny-scorer/3 has non-finite weights in {name}"):
        load_registered(_Version(), vlm)
    with pytest.raises(ValueError, match=f"models:/tiny-scorer@champion has non-finite weights in {name}"):
        load_scorer("models:/tiny-scorer@champion", vlm, _Version())


# ---- every project import names a module that exists ----------------------------------------
PACKAGES = ("autoselect", "minillava", "mlops", "pipelines", "serve", "tests")


def missing_modules(root: Path = ROOT) -> list[str]:
    """Imports of a project module that is not in the tree. Lazy imports inside functions only
    fail when that branch runs (bench/data_path.py kept importing ``autoselect.convert`` after the
    builder moved to ``minillava/``), so they are checked here, on the source."""
    problems = []
    for floor in (*FLOORS, "tests"):
        for path in sorted((root / floor).rglob("*.py")):
            for line, module in imported_modules(path, root):
                parts = module.split(".")
                if parts[0] not in PACKAGES:
                    continue
                target = root.joinpath(*parts)
                if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()
                        or _names_in_package(root.joinpath(*parts[:-1]), parts[-1])):
                    problems.append(f"{path.relative_to(root)}:{line}: no module {module}")
    return problems


def _names_in_package(package: Path, name: str) -> bool:
    """``from . import name`` may take a name defined in the package's ``__init__``."""
    init = package / "__init__.py"
    return init.is_file() and re.search(rf"\b{re.escape(name)}\b", init.read_text()) is not None


def test_every_project_import_names_an_existing_module():
    problems = missing_modules()
    assert not problems, "imports of modules that do not exist:\n  " + "\n  ".join(problems)


def test_the_missing_module_check_sees_lazy_imports(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "minillava").mkdir()
    (tmp_path / "minillava" / "__init__.py").write_text("")
    (tmp_path / "minillava" / "aligned.py").write_text("")
    (tmp_path / "bench" / "script.py").write_text(
        "import json\nfrom minillava.aligned import build\n"
        "def main():\n    from autoselect.convert.aligned import build\n    import minillava.gone\n")
    for floor in (*FLOORS, "tests"):
        (tmp_path / floor).mkdir(exist_ok=True)
    assert missing_modules(tmp_path) == ["bench/script.py:4: no module autoselect.convert.aligned",
                                         "bench/script.py:5: no module minillava.gone"]
