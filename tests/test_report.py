"""evals.report: run directories and result files -> report.md and PNG figures."""

import json

import numpy as np
import pytest

from evals import report


def _run(root, name, acc, knn, shots):
  d = root / name
  d.mkdir()
  with open(d / "metrics.jsonl", "w") as fh:
    for step in (10, 20, 30):
      fh.write(json.dumps({"step": step, "loss": 2.0 / step, "lr": 0.1 / step,
                           "probe/acc": acc / 100 * step / 30}) + "\n")
    fh.write('{"step": 40, "loss"')  # a line cut by a crash is skipped
  (d / "probe.json").write_text(json.dumps({"top1": acc, "l2": 1.0, "objectives": [name]}))
  (d / "knn.json").write_text(json.dumps({"top1": knn, "top5": 90.0, "k": 20}))
  (d / "fewshot.json").write_text(json.dumps({"1shot": shots, "1shot_std": 1.0}))
  return d


def test_report_writes_markdown_and_figures(tmp_path):
  from PIL import Image
  a = _run(tmp_path, "rotation", 40.0, 35.0, 20.0)
  b = _run(tmp_path, "simclr", 45.0, 41.0, 25.0)
  base = tmp_path / "baseline.json"
  base.write_text(json.dumps({"top1": 30.0, "l2": 1.0, "random_init": True}))
  vtab_row = lambda v: {"top1": v, "l2": 1.0, "num_train": 1000, "num_test": 50,
                        "group": "offline"}
  (a / "vtab.json").write_text(json.dumps({
      "tasks": {"shapes-count": vtab_row(50.0), "shapes-orient": vtab_row(30.0)},
      "groups": {"offline": 40.0}, "mean": 40.0}))
  (a / "layers.json").write_text(json.dumps({
      "layers": [{"layer": "stride8", "top1": 41.0}, {"layer": "pooled", "top1": 40.0}],
      "best_layer": "stride8"}))
  out = tmp_path / "report"
  written = report.write_report([str(a), str(b), str(base)], str(out))
  assert set(written) == {"curves.png", "accuracy.png", "vtab.png", "layers.png", "report.md"}
  for name in ("curves.png", "accuracy.png", "vtab.png", "layers.png"):
    with Image.open(out / name) as im:
      assert im.size[0] > 300 and im.size[1] > 200
      assert np.asarray(im.convert("L")).std() > 5  # something is drawn
  md = (out / "report.md").read_text()
  # The gain over the random-init baseline of the same protocol, per run.
  assert "| simclr | 45.00 (+15.00) | 41.00 | 25.00 |" in md
  assert "| random-init | 30.00 |  |  |" in md
  assert "| shapes-count | offline | 50.00 |" in md and "best layer **stride8**" in md
  rows = dict(report.accuracy_table(report.collect([str(a), str(b), str(base)])))
  assert rows["rotation"] == {"linear probe": 40.0, "kNN": 35.0, "1-shot": 20.0}


def test_report_reads_compare_rows_and_refuses_other_files(tmp_path):
  from selfsup.errors import UserError
  rows = [{"objectives": "random-init", "probe_top1": 32.0},
          {"objectives": "rotation", "probe_top1": 35.0}]
  (tmp_path / "compare.json").write_text(json.dumps(rows))
  runs = report.collect([str(tmp_path / "compare.json")])
  assert runs == {"random-init": {"probe": {"top1": 32.0}}, "rotation": {"probe": {"top1": 35.0}}}
  (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
  with pytest.raises(UserError, match="not a result"):
    report.collect([str(tmp_path / "other.json")])
  with pytest.raises(UserError, match="no such run directory"):
    report.collect([str(tmp_path / "missing")])
