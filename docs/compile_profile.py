"""Where a config's step spends its compile time: trace, lower, XLA compile, cache.

    PYTHONPATH=. python docs/compile_profile.py --cache /tmp/cc_r50 \
        experiments/simclr_imagenet.py train.batch_size=8     # cold: an empty cache
    PYTHONPATH=. python docs/compile_profile.py --cache /tmp/cc_r50 \
        experiments/simclr_imagenet.py train.batch_size=8     # warm: a new process, same cache

Builds the Trainer on synthetic batches of the config's shape (0 data workers), then
times the jitted step in stages, wall and this process's CPU seconds: `build` (the
Trainer: model, the jitted `init`, the first batch), `trace` (Python to jaxpr), `lower`
(StableHLO), `compile` (XLA's compile, or the persistent cache's load: `cache_events`
says which, from JAX's monitoring events), `cost` (the lowered step's cost analysis, the
bench's FLOP count). Also the size of the lowered program (`hlo_chars`, loops, calls,
convolutions) and XLA's memory analysis. One JSON line. `STEPS=N` also times N steps.
Used for the before/after table in README "Benchmark".
"""

import json
import os
import sys
import time


def main(argv):
  if len(argv) < 3 or argv[0] != "--cache":
    sys.exit(__doc__)
  import jax
  from jax import monitoring

  from evals.compare import parse_overrides, run_configs
  from selfsup.bench import cpu_seconds
  from selfsup.trainer import Trainer, step_memory
  # FILE.py[:ARG] with KEY=VALUE overrides (values read as Python literals), as
  # `evals.compare --config FILE --set KEY=VALUE` reads them.
  cache = argv[1]
  (_, config), = run_configs(argv[2], dataset="synthetic:shapes",
                             overrides=parse_overrides(argv[3:]))
  config.data.num_workers = 0
  config.train.progress_bar = False
  config.train.compile_cache = cache
  out = {}

  def stage(name, fn):
    t, c = time.perf_counter(), cpu_seconds()
    result = fn()
    out[name + "_s"] = round(time.perf_counter() - t, 2)
    out[name + "_cpu_s"] = round(cpu_seconds() - c, 2)
    return result

  trainer = stage("build", lambda: Trainer(config, None))
  batch = trainer.shard_batch(next(trainer.iterator))
  events = []
  monitoring.register_event_listener(
      lambda e, **_: events.append(e.rsplit("/", 1)[-1]) if "compilation_cache/cache_" in e
      else None)
  traced = stage("trace", lambda: trainer.step_fn.trace(trainer.state, batch))
  lowered = stage("lower", traced.lower)
  text = lowered.as_text()
  out["hlo_chars"] = len(text)
  for op in ("while", "case", "convolution", "dot_general", "sort"):
    out["n_" + op] = text.count("stablehlo." + op)
  out["n_func"] = text.count("func.func")
  compiled = stage("compile", lowered.compile)
  out["cache_events"] = events
  stage("cost", lowered.cost_analysis)
  memory = step_memory(compiled)
  out["temp_mib"] = round(memory.get("temp_size", 0) / 2**20, 1)
  out["peak_mib"] = round(memory.get("peak_bytes_per_device", 0) / 2**20, 1)
  if os.environ.get("STEPS"):
    n, state = int(os.environ["STEPS"]), trainer.state
    state, metrics, _ = compiled(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(n):
      state, metrics, _ = compiled(state, batch)
    jax.block_until_ready(metrics)
    out["step_s"] = round((time.perf_counter() - t) / n, 4)
    out["loss"] = float(metrics["loss"])
  out["process_cpu_s"] = round(cpu_seconds(), 2)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":   # the guard matters: grain's workers re-import this file
  main(sys.argv[1:])
