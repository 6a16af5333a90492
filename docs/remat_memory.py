"""XLA's temporaries and the time of one encoder gradient with each `train.remat` setting.

    PYTHONPATH=. python docs/remat_memory.py                      # ResNet-18, CIFAR stem
    PYTHONPATH=. python docs/remat_memory.py --encoder vit_ti --steps 0
    PYTHONPATH=. python docs/remat_memory.py --encoder convnext_tiny --steps 0

The gradient of sum(pooled ** 2) in train mode (BatchNorm statistics updated, stochastic
depth drawn), jitted and compiled ahead: `temp_mib` is the compiled program's
`memory_analysis().temp_size_in_bytes`; with `--steps N` also the best of N runs, wall
and this process's CPU seconds (all threads). One JSON line per setting.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--encoder", default="resnet18")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--remat", default="none,blocks,full")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from ml_collections import ConfigDict

  from encoders import build_encoder

  cfg = {"name": args.encoder}
  if args.encoder.startswith("resnet"):
    cfg["cifar_stem"] = args.image_size <= 32
  elif args.encoder.startswith("vit"):
    cfg["patch_size"] = 4 if args.image_size <= 32 else 16
  x = jnp.asarray(np.random.default_rng(0).normal(
      size=(args.batch_size, args.image_size, args.image_size, 3)), jnp.float32)
  for remat in args.remat.split(","):
    enc = build_encoder(ConfigDict(cfg), remat=remat)
    v = jax.jit(lambda enc=enc: enc.init(jax.random.key(0), x, train=True))()
    rest = {k: a for k, a in v.items() if k != "params"}

    def loss(p, rest, enc=enc):
      out, new = enc.apply({"params": p, **rest}, x, train=True, mutable=list(rest),
                           rngs={"dropout": jax.random.key(1)})
      return jnp.sum(out.pooled ** 2), new

    t = time.perf_counter()
    step = jax.jit(jax.grad(loss, has_aux=True)).lower(v["params"], rest).compile()
    out = {"encoder": args.encoder, "remat": remat, "batch_size": args.batch_size,
           "image_size": args.image_size,
           "temp_mib": round(step.memory_analysis().temp_size_in_bytes / 2**20, 1),
           "compile_s": round(time.perf_counter() - t, 1)}
    if args.steps:
      jax.block_until_ready(step(v["params"], rest))
      walls, cpus = [], []
      for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(step(v["params"], rest))
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
      out.update(step_s=round(min(walls), 2), step_cpu_s=round(min(cpus), 2),
                 load=round(os.getloadavg()[0], 1))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
  sys.exit(main())
