"""`python -m evals.report RUN_DIR_OR_RESULT.json... --output DIR`: a Markdown report with
PNG figures (matplotlib, no notebook needed).

Inputs are run directories (their `metrics.jsonl` gives the training curves, their
`result.json` the end-of-run probe; every other `*.json` in the directory, or in its
`evals/` sub-directory, that an evaluation CLI wrote is read too) and result files given
directly: the JSON of `evals.linear_probe`, `evals.knn`, `evals.fewshot`, `evals.vtab`
(one object each; `random_init: true` marks the baseline) or the row list of
`evals.compare --output`.

Writes DIR/report.md and, where there is something to draw:
  curves.png    loss, learning rate and online probe accuracy against the step, per run
  accuracy.png  linear probe / kNN / few-shot top-1 per run beside the random-init baseline
  vtab.png      per-task and per-group top-1 of every VTAB report, one bar per run
  layers.png    per-layer probe top-1, one line per run

From a notebook: `collect([...])` then `plot_curves(runs, ax=...)`, `plot_accuracy(...)`.
"""

from __future__ import annotations

import glob
import json
import os

from absl import flags

from selfsup import cli
from selfsup.errors import UserError

CURVES = (("loss", "loss"), ("lr", "learning rate"), ("probe/acc", "online probe accuracy"))


def _kind(obj) -> str | None:
  if isinstance(obj, list):
    return "compare" if obj and all(isinstance(r, dict) and "probe_top1" in r for r in obj) \
        else None
  if not isinstance(obj, dict):
    return None
  if "tasks" in obj and "groups" in obj:
    return "vtab"
  if "layers" in obj:
    return "layers"
  if any(k.endswith("shot") for k in obj):
    return "fewshot"
  if "k" in obj and "top1" in obj:
    return "knn"
  if obj.get("protocol") == "sgd":
    return "sgd"
  if "top1" in obj and "l2" in obj:
    return "probe"
  if "probe_top1" in obj:
    return "result"
  return None


def _read_json(path):
  try:
    with open(path) as fh:
      text = fh.read()
  except OSError as e:
    raise UserError(f"cannot read {path} ({e.strerror or e})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    # A JSON-lines file (compare's FILEl, a CLI's printed line): the last object.
    lines = [l for l in text.splitlines() if l.strip()]
    try:
      return json.loads(lines[-1]) if len(lines) == 1 else [json.loads(l) for l in lines]
    except (json.JSONDecodeError, IndexError):
      raise UserError(f"{path} is not JSON (a result of an evals command or "
                      "evals.compare --output)") from None


def _name_of(obj, fallback):
  objectives = obj.get("objectives") if isinstance(obj, dict) else None
  if isinstance(objectives, list) and objectives:
    return "+".join(objectives)
  return fallback


def collect(paths) -> dict:
  """{run name: {"curves": [rows], "probe", "knn", "fewshot", "sgd", "vtab", "layers"}};
  the random-init baselines are runs named 'random-init'."""
  runs: dict = {}

  def add(name, kind, obj):
    if isinstance(obj, dict) and obj.get("random_init"):
      name = "random-init"
    runs.setdefault(name, {})[kind] = obj

  for path in paths:
    if os.path.isdir(path):
      name = os.path.basename(os.path.normpath(path))
      metrics = os.path.join(path, "metrics.jsonl")
      if os.path.exists(metrics):
        rows = []
        with open(metrics) as fh:
          for line in fh:
            try:
              rows.append(json.loads(line))
            except json.JSONDecodeError:
              continue  # a line cut by a crash
        runs.setdefault(name, {})["curves"] = rows
      files = sorted(glob.glob(os.path.join(path, "*.json")) +
                     glob.glob(os.path.join(path, "evals", "*.json")))
      found = "curves" in runs.get(name, {})
      for f in files:
        if os.path.basename(f) == "config.json":
          continue
        obj = _read_json(f)
        kind = _kind(obj)
        if kind == "result":
          add(name, "probe", {"top1": obj["probe_top1"]})
          if "random_init_probe_top1" in obj:
            add("random-init", "probe", {"top1": obj["random_init_probe_top1"]})
        elif kind == "compare":
          for row in obj:
            add(row["objectives"], "probe", {"top1": row["probe_top1"]})
        elif kind:
          add(name, kind, obj)
        found = found or bool(kind)
      if not found:
        raise UserError(f"{path} holds neither a metrics.jsonl nor evaluation results; give "
                        "run directories or result files")
    elif os.path.isfile(path):
      obj = _read_json(path)
      kind = _kind(obj)
      if kind is None:
        raise UserError(f"{path} is not a result of an evals command (probe, knn, fewshot, "
                        "vtab, layers) or evals.compare")
      if kind == "compare":
        for row in obj:
          add(row["objectives"], "probe", {"top1": row["probe_top1"]})
      elif kind == "result":
        add(_name_of(obj, os.path.splitext(os.path.basename(path))[0]), "probe",
            {"top1": obj["probe_top1"]})
      else:
        add(_name_of(obj, os.path.splitext(os.path.basename(path))[0]), kind, obj)
    else:
      raise UserError(f"{path}: no such run directory or result file")
  return runs


# ----------------------------------------------------------------------------------------
# Figures (each draws on a given matplotlib Axes, so notebooks can compose them).


def _order(runs):
  names = [n for n in runs if n != "random-init"]
  return (["random-init"] if "random-init" in runs else []) + names


def _color(runs, name):
  """One colour per run across every figure (the random-init baseline is grey)."""
  if name == "random-init":
    return "0.6"
  return f"C{[n for n in _order(runs) if n != 'random-init'].index(name) % 10}"


def plot_curves(runs, axes=None):
  """Training curves per run: one Axes per quantity of CURVES that any run logged."""
  import matplotlib.pyplot as plt
  keys = [(k, label) for k, label in CURVES
          if any(k in row for r in runs.values() for row in r.get("curves", []))]
  if not keys:
    return None
  if axes is None:
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    axes = axes[0]
  for ax, (key, label) in zip(axes, keys):
    for name in _order(runs):
      rows = [r for r in runs[name].get("curves", []) if key in r and "step" in r]
      if rows:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name, marker=".",
                color=_color(runs, name))
    ax.set_xlabel("step")
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  return axes[0].figure


def accuracy_table(runs) -> list[tuple[str, dict]]:
  """[(run, {"linear probe": top1, "kNN": top1, "10-shot": top1, "SGD probe": top1})]."""
  out = []
  for name in _order(runs):
    r = runs[name]
    row = {}
    if "probe" in r:
      row["linear probe"] = r["probe"]["top1"]
    if "sgd" in r:
      row["SGD probe"] = r["sgd"]["top1"]
    if "knn" in r:
      row["kNN"] = r["knn"]["top1"]
    if "fewshot" in r:
      shots = [k for k in r["fewshot"] if k.endswith("shot")]
      for k in shots:
        row[k.replace("shot", "-shot")] = r["fewshot"][k]
    if row:
      out.append((name, row))
  return out


def plot_accuracy(runs, ax=None):
  """Grouped bars: each evaluation's top-1 per run; the random-init baseline hatched."""
  import matplotlib.pyplot as plt
  import numpy as np
  table = accuracy_table(runs)
  if not table:
    return None
  metrics = list(dict.fromkeys(k for _, row in table for k in row))
  if ax is None:
    _, ax = plt.subplots(figsize=(max(5, 1.4 * len(metrics) * len(table) / 2 + 2), 3.6))
  width = 0.8 / len(table)
  x = np.arange(len(metrics))
  for i, (name, row) in enumerate(table):
    values = [row.get(m, np.nan) for m in metrics]
    bars = ax.bar(x + (i - (len(table) - 1) / 2) * width, values, width, label=name,
                  color=_color(runs, name), hatch="//" if name == "random-init" else None,
                  edgecolor="black" if name == "random-init" else None)
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
  ax.set_xticks(x, metrics)
  ax.set_ylabel("top-1 (%)")
  ax.set_title("frozen features vs the random-init baseline")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  return ax.figure


def plot_vtab(runs, axes=None):
  """Per-task (left) and per-group + mean (right) top-1 bars, one colour per run."""
  import matplotlib.pyplot as plt
  import numpy as np
  names = [n for n in _order(runs) if "vtab" in runs[n]]
  if not names:
    return None
  tasks = list(dict.fromkeys(t for n in names for t in runs[n]["vtab"]["tasks"]))
  groups = list(dict.fromkeys(g for n in names for g in runs[n]["vtab"]["groups"])) + ["mean"]
  if axes is None:
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.6 * len(tasks) * len(names) / 2 + 3) + 4,
                                            3.8), gridspec_kw={"width_ratios": [3, 1]})
  width = 0.8 / len(names)
  for i, n in enumerate(names):
    rep = runs[n]["vtab"]
    off = (i - (len(names) - 1) / 2) * width
    axes[0].bar(np.arange(len(tasks)) + off,
                [rep["tasks"].get(t, {}).get("top1", np.nan) for t in tasks], width, label=n,
                color=_color(runs, n), hatch="//" if n == "random-init" else None)
    vals = [rep["groups"].get(g, np.nan) for g in groups[:-1]] + [rep.get("mean") or np.nan]
    bars = axes[1].bar(np.arange(len(groups)) + off, vals, width, label=n,
                       color=_color(runs, n), hatch="//" if n == "random-init" else None)
    axes[1].bar_label(bars, fmt="%.1f", fontsize=7)
  axes[0].set_xticks(np.arange(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
  axes[1].set_xticks(np.arange(len(groups)), groups)
  axes[0].set_ylabel("top-1 (%)")
  axes[0].set_title("per task")
  axes[1].set_title("per group")
  axes[0].legend(fontsize=8)
  for ax in axes:
    ax.grid(axis="y", alpha=0.3)
  return axes[0].figure


def plot_layers(runs, ax=None):
  import matplotlib.pyplot as plt
  names = [n for n in _order(runs) if "layers" in runs[n]]
  if not names:
    return None
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 3.6))
  for n in names:
    rows = runs[n]["layers"]["layers"]
    ax.plot([r["layer"] for r in rows], [r["top1"] for r in rows], marker="o", label=n,
            color=_color(runs, n))
  ax.set_ylabel("top-1 (%)")
  ax.set_title("linear probe per layer")
  ax.tick_params(axis="x", rotation=45)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return ax.figure


# ----------------------------------------------------------------------------------------


def write_report(paths, output: str) -> dict:
  """Collects `paths`, writes DIR/report.md and the figures; returns {file: path}."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = collect(paths)
  os.makedirs(output, exist_ok=True)
  written = {}
  for fname, fn in (("curves.png", plot_curves), ("accuracy.png", plot_accuracy),
                    ("vtab.png", plot_vtab), ("layers.png", plot_layers)):
    fig = fn(runs)
    if fig is None:
      continue
    fig.tight_layout()
    path = os.path.join(output, fname)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    written[fname] = path
  lines = ["# Evaluation report", "", f"Runs: {', '.join(_order(runs))}.", ""]
  if "curves.png" in written:
    lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    lines += ["| run | steps | final loss |", "|---|---:|---:|"]
    for n in _order(runs):
      rows = runs[n].get("curves") or []
      last = next((r for r in reversed(rows) if "loss" in r), None)
      if last:
        lines.append(f"| {n} | {last['step']} | {last['loss']:.4f} |")
    lines.append("")
  table = accuracy_table(runs)
  if table:
    metrics = list(dict.fromkeys(k for _, row in table for k in row))
    base = dict(table).get("random-init", {})
    lines += ["## Frozen-feature accuracy (top-1 %, gain over random-init)", "",
              "![accuracy](accuracy.png)", "",
              "| run | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, row in table:
      cells = []
      for m in metrics:
        if m not in row:
          cells.append("")
        elif name != "random-init" and m in base:
          cells.append(f"{row[m]:.2f} ({row[m] - base[m]:+.2f})")
        else:
          cells.append(f"{row[m]:.2f}")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  if "vtab.png" in written:
    from evals.vtab import markdown
    lines += ["## Task suites", "", "![task suites](vtab.png)", ""]
    for n in _order(runs):
      if "vtab" in runs[n]:
        lines += [markdown(runs[n]["vtab"], title=n), ""]
  if "layers.png" in written:
    lines += ["## Per-layer probes", "", "![layers](layers.png)", ""]
    for n in _order(runs):
      if "layers" in runs[n]:
        rows = runs[n]["layers"]["layers"]
        lines += [f"{n}: best layer **{runs[n]['layers']['best_layer']}**; " + ", ".join(
            f"{r['layer']} {r['top1']:.2f}" for r in rows), ""]
  path = os.path.join(output, "report.md")
  with open(path + ".tmp", "w") as fh:
    fh.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  written["report.md"] = path
  return written


def _define_flags():
  flags.DEFINE_string("output", None, "directory for report.md and the figures")


def main(argv):
  paths = argv[1:]
  f = flags.FLAGS
  if not paths or not f.output:
    raise UserError("usage: python -m evals.report RUN_DIR_OR_RESULT.json... --output DIR")
  if os.path.isfile(f.output):
    raise UserError(f"--output {f.output} is a file; give a directory")
  written = write_report(paths, f.output)
  print(json.dumps(written))


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
