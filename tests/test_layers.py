"""The core's two layers stay apart: library modules never import runner modules.

`selfsup/` is a library layer (data, augmentation, sharding, optimisers, checkpoints,
logging, errors, the run directory's files) that evaluation, notebooks and objectives
use on their own, and a runner layer (model, config, trainer, train CLI, bench, CLI
plumbing) that wires them together. Objectives and encoders sit beside the library and
never reach into the runner; evaluation never imports the training loop.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LIBRARY = ("augment", "data", "sharding", "optim", "checkpoint", "errors", "metrics_log",
           "workdir", "distributed")
RUNNER = ("model", "config", "trainer", "train", "bench", "cli", "phases")


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Every module a file imports, at any depth (function-local imports included)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      # `from selfsup import trainer` names the module in the alias.
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return found


def _files(*parts: str) -> list[pathlib.Path]:
  out = []
  for part in parts:
    p = ROOT / part
    out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")])
  return [f for f in out if f.exists()]


def _runner_imports(path: pathlib.Path, forbidden=RUNNER) -> list[str]:
  bad = {f"selfsup.{name}" for name in forbidden}
  return sorted(m for m in _imported_modules(path)
                if any(m == b or m.startswith(b + ".") for b in bad))


def test_the_layer_lists_cover_every_core_module():
  modules = {p.stem for p in (ROOT / "selfsup").glob("*.py") if p.stem != "__init__"}
  modules |= {p.name for p in (ROOT / "selfsup").iterdir()
              if p.is_dir() and (p / "__init__.py").exists()}
  assert modules == set(LIBRARY) | set(RUNNER), (
      "a core module was added or removed: put it in LIBRARY or RUNNER here and in "
      "docs/design.md")


@pytest.mark.parametrize("path", _files(*(f"selfsup/{m}" for m in LIBRARY)),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_library_modules_do_not_import_the_runner(path):
  assert _runner_imports(path) == []


@pytest.mark.parametrize("path", _files("objectives", "encoders"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_objectives_and_encoders_do_not_import_the_runner(path):
  assert _runner_imports(path) == []


@pytest.mark.parametrize("path", _files("evals"), ids=lambda p: str(p.relative_to(ROOT)))
def test_evaluation_does_not_import_the_training_loop(path):
  # evals.compare trains on purpose (it is the one runner in evals/).
  if path.name == "compare.py":
    pytest.skip("compare trains each objective by design")
  assert _runner_imports(path, forbidden=("trainer", "train", "bench")) == []


def test_the_checker_sees_a_forbidden_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from selfsup.trainer import Trainer\n  from selfsup import bench\n")
  assert _runner_imports(bad) == ["selfsup.bench", "selfsup.trainer", "selfsup.trainer.Trainer"]
