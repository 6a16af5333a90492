"""docs/compare_objectives.ipynb executes (nbclient) at a tiny budget, so it never goes
stale: two objectives, one training step each, 16 px, a few probe images."""

import os

import pytest

from conftest import ROOT


@pytest.mark.ci
def test_compare_objectives_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  budget = {"NB_OBJECTIVES": "rotation,simclr", "NB_STEPS": "1", "NB_BATCH": "8",
            "NB_IMAGE_SIZE": "16", "NB_PROBE_TRAIN": "48", "NB_PROBE_TEST": "24",
            "NB_WORKDIR": str(tmp_path / "runs"),
            "NB_ENCODER": '{"name": "tiny_cnn", "width_multiplier": 0.25}',
            "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  for key, value in budget.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(ROOT, "docs", "compare_objectives.ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs)
  assert "linear probe top-1" in text and "kNN top-1" in text
  assert "['random-init', 'rotation', 'simclr']" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the training curves and the accuracy bars
  assert os.path.isdir(tmp_path / "runs" / "simclr" / "checkpoints")
