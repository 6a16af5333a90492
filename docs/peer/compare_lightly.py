"""SimCLR here against lightly's (PyTorch), one recipe and one probe.

    python docs/peer/compare_lightly.py --dataset folder:/data/cifar10 \
        --workdir runs/peer --torch_python /work/peer-venv/bin/python [--width 0.25] \
        [--ours_arg lightly_init|default|per_view_bn] [--lightly_args=--no_decay_bn_bias]

1. Writes the probe's inputs (the 10,000 / 2,000 images our probe reads, as the float
   tensors it feeds the encoder: resized, centre-cropped, ImageNet-normalised) to
   WORKDIR/probe_inputs.npy.npz.
2. Runs `docs/peer/lightly_simclr.py` with the torch interpreter (a separate virtualenv;
   skipped with --skip_lightly when WORKDIR/lightly.npz exists), which trains lightly's
   SimCLR with the recipe and saves random-init and trained features of those inputs.
3. Trains our SimCLR with the same recipe (`docs/peer/simclr_lightly_recipe.py`) through
   `evals.compare`, which also probes our random-init encoder.
4. Probes lightly's features with our probe (`evals.linear_probe.probe_features`) and
   prints one table (JSON rows to WORKDIR/table.jsonl).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)


def probe_inputs(dataset: str, path: str, max_train: int, max_test: int) -> None:
  """The exact tensors our probe feeds the encoder, for the same seeded subsets."""
  from evals import stream
  from evals.linear_probe import ProbeData
  from selfsup import augment
  data = ProbeData(dataset, 32, max_train=max_train, max_test=max_test)
  out = {}
  for part, source, limit in zip(("train", "test"), data.sources(), (max_train, max_test)):
    fn = lambda variables, images: augment.eval_view(images).reshape(images.shape[0], -1)
    x, y = stream.stream_features(fn, {}, source, image_size=32, max_examples=limit,
                                  seed=data.subset_seed)
    out[f"{part}_x"] = x.reshape(-1, 32, 32, 3).astype(np.float32)
    out[f"{part}_y"] = y
  np.savez(path, **out)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", required=True, help="folder:PATH with train/ and test/")
  p.add_argument("--workdir", required=True)
  p.add_argument("--torch_python", default="/work/peer-venv/bin/python")
  p.add_argument("--steps", type=int, default=100, help="training steps (both)")
  p.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier (both)")
  p.add_argument("--max_train", type=int, default=10000)
  p.add_argument("--max_test", type=int, default=2000)
  p.add_argument("--ours_arg", default="lightly_init",
                 help="docs/peer/simclr_lightly_recipe.py:ARG (lightly_init = torchvision's "
                      "initialisation, part of lightly's recipe; 'default' = ours)")
  p.add_argument("--lightly_args", default="", help="extra flags for lightly_simclr.py")
  p.add_argument("--lightly_name", default="lightly", help="file stem of lightly's run")
  p.add_argument("--skip_lightly", action="store_true")
  p.add_argument("--skip_ours", action="store_true")
  args = p.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  table = os.path.join(args.workdir, "table.jsonl")

  def log(row):
    print(json.dumps(row), flush=True)
    with open(table, "a") as fh:
      fh.write(json.dumps(row) + "\n")

  inputs = os.path.join(args.workdir, "probe_inputs.npz")
  if not os.path.exists(inputs):
    probe_inputs(args.dataset, inputs, args.max_train, args.max_test)
  lightly_out = os.path.join(args.workdir, f"{args.lightly_name}.npz")
  if not args.skip_lightly:
    subprocess.run([args.torch_python, os.path.join(HERE, "lightly_simclr.py"),
                    "--data", args.dataset.split(":", 1)[1], "--probe_inputs", inputs,
                    "--out", lightly_out, "--width", str(args.width),
                    "--steps", str(args.steps)] + args.lightly_args.split(), check=True)
  from evals.linear_probe import probe_features
  labels = np.load(inputs)
  if os.path.exists(lightly_out):
    got = np.load(lightly_out)
    for name, prefix in ((f"{args.lightly_name} random-init", "random_"),
                         (f"{args.lightly_name} simclr", "")):
      r = probe_features(got[f"{prefix}train_x"], labels["train_y"], got[f"{prefix}test_x"],
                         labels["test_y"])
      row = {"run": name, "probe_top1": r["top1"], "probe_top5": r["top5"], "l2": r["l2"]}
      if not prefix:
        losses = got["losses"]
        row.update(final_loss=float(losses[-1]), mean_loss_last10=float(losses[-10:].mean()),
                   train_seconds=float(got["train_seconds"]))
      log(row)
  if not args.skip_ours:
    from evals.compare import compare
    config = os.path.join(HERE, "simclr_lightly_recipe.py")
    if args.ours_arg:
      config += ":" + args.ours_arg
    name = "ours " + (args.ours_arg or "default")
    rows = compare(None, config=config, dataset=args.dataset,
                   workdir=os.path.join(args.workdir, "ours_" + (args.ours_arg or "default")),
                   max_train=args.max_train, max_test=args.max_test,
                   encoder={"width_multiplier": args.width}, steps=args.steps,
                   log=lambda *a, **k: None)
    for r in rows:
      row = {"run": f"{name} {r['objectives']}", "probe_top1": r["probe_top1"],
             "probe_top5": r["probe_top5"], "l2": r["l2"]}
      if r.get("final_loss") is not None:
        row.update(final_loss=r["final_loss"], train_seconds=r["train_seconds"])
      log(row)


if __name__ == "__main__":
  main()
