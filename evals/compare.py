"""`python -m evals.compare`: pretrain several objectives the same way and probe each.

Trains every objective (or `+`-joined combination) named in `--objectives` with the same
encoder, data, optimizer and budget (the quickstart config with its per-objective
settings, overridden by the flags), probes each frozen encoder with the L-BFGS linear
probe, and probes one random-init encoder of the same architecture as the baseline.
Prints a table and writes a JSON list, one row per run:

    python -m evals.compare --dataset folder:/data/cifar10 --encoder resnet18 \
        --width_multiplier 0.25 --cifar_stem --steps 300 \
        --objectives rotation,simclr,rotation+simclr --workdir runs/compare

From a notebook: `compare(["rotation", "simclr"], dataset=..., workdir=...)`.
"""

import json
import os
import time

from absl import flags

from selfsup import cli


def run_config(spec: str, *, dataset: str, encoder: dict, steps: int, batch_size: int,
               image_size: int, seed: int = 0, data_dir=None, dtype: str = "float32"):
  from experiments.quickstart import get_config
  c = get_config(spec)
  c.seed = seed
  c.data.source = dataset
  c.data.image_size = image_size
  c.data.data_dir = data_dir or ""
  c.encoder = encoder
  c.train.steps = steps
  c.train.batch_size = batch_size
  c.train.dtype = dtype
  c.train.log_every = max(1, min(50, steps // 10))
  c.train.checkpoint_every = steps
  c.train.progress_bar = False
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 10)
  c.probe.enabled = False
  return c


def compare(specs, *, dataset: str, workdir: str, encoder: dict, steps: int = 300,
            batch_size: int = 128, image_size: int = 32, max_train=10000, max_test=2000,
            seed: int = 0, data_dir=None, dtype: str = "float32", log=print) -> list[dict]:
  from ml_collections import ConfigDict

  import encoders as encoders_lib
  from evals.linear_probe import load_split, probe_live, probe_random_init
  from selfsup.trainer import Trainer

  train = load_split(dataset, "train", image_size, max_train, data_dir)
  test = load_split(dataset, "test", image_size, max_test, data_dir)
  rows = []
  # The baseline first: a run cut short still has it.
  result = probe_random_init(encoders_lib.build_encoder(ConfigDict(encoder)), image_size,
                             train, test, seed=seed)
  rows.append({"objectives": "random-init", "probe_top1": result["top1"],
               "probe_top5": result["top5"], "l2": result["l2"], "steps": 0})
  log(json.dumps(rows[-1]), flush=True)
  for spec in specs:
    config = run_config(spec, dataset=dataset, encoder=encoder, steps=steps,
                        batch_size=batch_size, image_size=image_size, seed=seed,
                        data_dir=data_dir, dtype=dtype)
    t0 = time.perf_counter()
    trainer = Trainer(config, os.path.join(workdir, spec.replace("+", "_")))
    last = trainer.run()
    train_s = time.perf_counter() - t0
    result = probe_live(trainer, train, test)
    row = {"objectives": spec, "probe_top1": result["top1"], "probe_top5": result["top5"],
           "l2": result["l2"], "steps": steps, "train_seconds": round(train_s, 1),
           "images_per_s": round(last.get("images_per_s", float("nan")), 1),
           "final_loss": last.get("loss")}
    row.update({k: v for k, v in last.items() if k.endswith("/loss")})
    rows.append(row)
    log(json.dumps(row), flush=True)
  return rows


def _define_flags():
  """Flags exist only when run as a program, so importing this module defines none."""
  flags.DEFINE_string("dataset", "synthetic:shapes", "SOURCE with train and test splits")
  flags.DEFINE_string("objectives", "rotation,simclr", "comma-separated; NAME+NAME = combination")
  flags.DEFINE_string("workdir", "runs/compare", "one sub-directory per run")
  flags.DEFINE_string("encoder", "tiny_cnn", "encoder name")
  flags.DEFINE_float("width_multiplier", 1.0, "encoder width multiplier")
  flags.DEFINE_bool("cifar_stem", False, "ResNet CIFAR stem")
  flags.DEFINE_integer("steps", 300, "pretraining steps per objective")
  flags.DEFINE_integer("batch_size", 128, "global batch")
  flags.DEFINE_integer("image_size", 32, "image size")
  flags.DEFINE_integer("max_train", 10000, "probe training examples")
  flags.DEFINE_integer("max_test", 2000, "probe test examples")
  flags.DEFINE_integer("seed", 0, "seed")
  flags.DEFINE_string("output", None, "write the rows here (JSON; rows also stream to FILEl)")
  flags.DEFINE_string("dtype", "float32", "compute dtype: float32 | bfloat16")


def main(argv):
  del argv
  f = flags.FLAGS
  encoder = {"name": f.encoder, "width_multiplier": f.width_multiplier}
  if f.encoder.startswith("resnet"):
    encoder["cifar_stem"] = f.cifar_stem
  def log(line, flush=True):
    print(line, flush=flush)
    if f.output:  # one row at a time, so a run cut short keeps what it finished
      with open(f.output + "l", "a") as fh:
        fh.write(line + "\n")

  rows = compare([s for s in f.objectives.split(",") if s], dataset=f.dataset,
                 workdir=f.workdir, encoder=encoder, steps=f.steps, batch_size=f.batch_size,
                 image_size=f.image_size, max_train=f.max_train, max_test=f.max_test,
                 seed=f.seed, dtype=f.dtype, log=log)
  print(f"{'objectives':32s} {'probe top-1':>11s} {'train s':>8s}")
  for r in rows:
    print(f"{r['objectives']:32s} {r['probe_top1']:11.2f} {r.get('train_seconds', 0):8.1f}")
  if f.output:
    with open(f.output, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
