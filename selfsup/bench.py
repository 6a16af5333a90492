"""`python -m selfsup.bench --config experiments/NAME.py[:ARG] [--steps N] [--data SOURCE] [--input]`

Measures the jitted train step of a config on the devices present and prints one JSON
line: compile time cold (`compile_s`, an empty persistent cache) and warm
(`compile_warm_s`, loaded from the cache, as a repeated or resumed run does), each split
into tracing + lowering (`trace_s`, `trace_warm_s`: Python, paid by every process) and
XLA (`xla_compile_s`; `xla_compile_warm_s` is the cache's load), their CPU seconds
(`compile_cpu_s`, `compile_warm_cpu_s`) and `cache_hit_warm` (JAX's cache-hit event
during the warm compile, so a warm time is never a silent recompile), step time,
images/s, `peak_bytes_per_device` (XLA's memory analysis of the compiled step), FLOPs
per step (XLA's cost analysis of the lowered step, see `step_flops`) and MFU = FLOPs
per step / step time / (peak FLOP/s x devices).

`--input` also times the host pipeline alone (`input_images_per_s`: decode, resize and
batch by the trainer's own iterator with `config.data.num_workers` workers, per worker
too) and prints `input_over_step`, its ratio to the step's images/s: below 1 the
devices would wait for the host. Give it real data (`--data=folder:PATH`): the synthetic
source renders its images instead of decoding them.

The step is timed on one host batch reused (device throughput: the input pipeline is
not in the loop; it runs ahead on the host in training). Peak FLOP/s comes from a table
of accelerators (dense, for the compute dtype); on CPU it is measured with a large
matmul, so CPU MFU says how close the step gets to this machine's own matmul speed.

Data: a benchmark of the step needs no real data, so by default the batch is synthetic
(`synthetic:shapes` rendered at the config's image size and batch size; nothing to
download, runs on a fresh machine). `--data=config` uses the config's own
`data.source`; `--data=SOURCE` (e.g. `folder:/data/cifar10`) uses that source. The
shapes source has its own length, which only matters for objectives whose state grows
with the dataset (NAT's target table); give the real source to bench those at full size.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from selfsup import cli

# Dense peak TFLOP/s per chip: (bfloat16, float32). float32 matmuls on GPUs run as TF32
# under JAX's default precision, so the f32 column is the TF32 peak there.
PEAK_TFLOPS = {
    "H100": (989.0, 494.5), "H200": (989.0, 494.5), "GH200": (989.0, 494.5),
    "A100": (312.0, 156.0), "L4": (121.0, 60.0), "V100": (125.0, 15.7),
    "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0), "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0), "TPU v6 lite": (918.0, 918.0), "TPU v6e": (918.0, 918.0),
}

def _define_flags():
  """Flags exist only when run as a program, so importing this module defines none."""
  config_flags.DEFINE_config_file("config", None, "experiment config file [:ARG]",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 20, "timed steps (after one warm-up step), >= 1")
  flags.DEFINE_string("data", "synthetic", "synthetic (default: synthetic batches of the "
                      "config's shape) | config (the config's data.source) | a SOURCE")
  flags.DEFINE_bool("input", False, "also time the host input pipeline alone (decode, "
                    "resize, batch with config.data.num_workers workers) and print its "
                    "images/s next to the step's, with the ratio")
  flags.DEFINE_integer("input_batches", 20, "batches timed by --input")
  flags.DEFINE_bool("input_only", False, "time the host input pipeline only (no step, no "
                    "compile): sizing hosts without an accelerator")


SYNTHETIC = "synthetic:shapes"


def with_data(config, data: str):
  """The config with the data source the benchmark uses (see the module docstring)."""
  if data == "synthetic":
    config.data.source = SYNTHETIC
  elif data != "config":
    config.data.source = data
  # The step is timed, not a run's first phase: G-SimCLR's clustering phase is skipped,
  # and without a cluster file of this source the batch order is a plain shuffle (the
  # order changes which images share a batch, not the step's cost).
  config.clusters.enabled = False
  if data != "config" or not config.data.cluster_file:
    config.data.order = "shuffle"
    config.data.cluster_file = ""
  return config


def device_peak_flops(dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number came from)."""
  device = jax.devices()[0]
  kind = device.device_kind
  for name, (bf16, f32) in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return (bf16 if dtype == "bfloat16" else f32) * 1e12, f"table:{name}"
  return measured_matmul_flops(dtype), "measured_matmul"


def measured_matmul_flops(dtype: str, n: int = 1024, repeats: int = 5) -> float:
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  a = jnp.ones((n, n), dt)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - t0)


def _flops(cost) -> float:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")) or float("nan"))


def step_flops(lowered, compiled) -> float:
  """FLOPs of one step from XLA's cost analysis of the step's HLO before backend passes.

  The compiled module's analysis misses work handed to libraries: on GPUs convolutions
  become cuDNN custom calls that it does not count (a ResNet-18 SimCLR step on an H200
  reported 22 GFLOP instead of ~3 TFLOP). The lowered module is backend-independent and
  counts every convolution and matmul; the compiled count is the fallback.
  """
  try:
    flops = _flops(lowered.cost_analysis())
  except Exception:  # some backends cannot analyse the lowered module
    flops = float("nan")
  if flops != flops:  # NaN
    flops = _flops(compiled.cost_analysis())
  return flops


def cpu_seconds() -> float:
  """This process's CPU seconds so far (user + system)."""
  import resource
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed_compile(jitted, *args) -> dict:
  """Compiles a jitted function for args in stages, timed (wall and this process's CPU).

  trace_s: tracing to a jaxpr and lowering to StableHLO (Python, pays again in every
  new process: the persistent cache does not skip it); xla_s: XLA's compile, or the
  persistent cache's load on a hit (cache_hits / cache_misses count the lookups, from
  JAX's monitoring events); total_s: both. Also returns the lowered and compiled step.
  """
  from jax import monitoring
  counts = {"cache_hits": 0, "cache_misses": 0}

  def listen(event, **_):
    for name in counts:
      if event == f"/jax/compilation_cache/{name}":
        counts[name] += 1

  monitoring.register_event_listener(listen)
  try:
    t0, c0 = time.perf_counter(), cpu_seconds()
    lowered = jitted.trace(*args).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), cpu_seconds()
  finally:
    monitoring.unregister_event_listener(listen)
  return {"trace_s": round(t1 - t0, 3), "xla_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
          "cpu_s": round(c2 - c0, 3), **counts, "lowered": lowered, "compiled": compiled}


def measure_input(iterator, batches: int) -> tuple[float, int]:
  """(images/s, images) of the host pipeline alone, after one warm-up batch (worker
  start-up excluded): decode, resize, batch, as the trainer's iterator does it."""
  first = next(iterator)
  n = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    n += len(next(iterator)["image"])
  return n / (time.perf_counter() - t0), len(first["image"])


def benchmark_input(config, batches: int = 20) -> dict:
  """The host pipeline alone, as the trainer builds it (this process's rows, canvases,
  config.data.num_workers workers); no devices involved."""
  from selfsup import config as config_lib
  from selfsup import data as data_lib
  source = data_lib.make_source(config.data.source, config.data.train_split,
                                image_size=config.data.image_size,
                                data_dir=config.data.data_dir or None)
  it = data_lib.make_pipeline(
      source, batch_size=config.train.batch_size, image_size=config.data.image_size,
      seed=config.seed, num_workers=config.data.num_workers, prefetch=config.data.prefetch,
      canvas_size=config_lib.canvas_size(config), process_index=0, process_count=1)
  rate, _ = measure_input(it, batches)
  workers = config.data.num_workers
  return {"data": config.data.source, "image_size": config.data.image_size,
          "canvas_size": config_lib.canvas_size(config),
          "batch_size": config.train.batch_size, "num_workers": workers,
          "input_images_per_s": round(rate, 1),
          "input_images_per_s_per_worker": round(rate / max(1, workers), 1),
          "batches": batches}


def benchmark(config, steps: int = 20, input_batches: int = 0) -> dict:
  """The bench line. Compile is timed cold (an empty persistent cache, in a temporary
  folder) and warm (the same step again after clearing JAX's in-memory caches: what a
  repeated or resumed run pays with the cache on). input_batches > 0 also times the
  host pipeline alone over that many batches."""
  import shutil
  import tempfile

  from selfsup.errors import UserError
  from selfsup.trainer import Trainer, step_memory
  if steps < 1:
    raise UserError(f"--steps must be >= 1 (timed steps), got {steps}")
  config.unlock()
  cache = tempfile.mkdtemp(prefix="selfsup-bench-cache-")
  config.train.compile_cache = cache
  trainer = Trainer(config, None)
  extra = {}
  if input_batches:
    rate, _ = measure_input(trainer.iterator, input_batches)
    workers = config.data.num_workers
    extra.update(input_images_per_s=round(rate, 1), num_workers=workers,
                 input_images_per_s_per_worker=round(rate / max(1, workers), 1))
  batch = trainer.shard_batch(next(trainer.iterator))
  cold = timed_compile(trainer.step_fn, trainer.state, batch)
  lowered, compiled = cold.pop("lowered"), cold.pop("compiled")
  jax.clear_caches()
  warm = timed_compile(trainer.step_fn, trainer.state, batch)
  compiled = warm.pop("compiled")
  del warm["lowered"]
  memory = step_memory(compiled)
  # XLA's cost analysis counts a loop body once: with train.accumulate=K the K
  # micro-batches are a scan, so scale (the optimizer update, outside it, is small).
  flops = step_flops(lowered, compiled) * max(1, config.train.accumulate)
  state = trainer.state
  state, metrics, _ = compiled(state, batch)   # warm-up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics, _ = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps
  n_dev = len(jax.devices())
  shutil.rmtree(cache, ignore_errors=True)   # the bench's own cold cache
  peak, peak_source = device_peak_flops(config.train.dtype)
  return {
      "objectives": list(config.objectives.keys()),
      "encoder": config.encoder.name,
      "image_size": config.data.image_size,
      "batch_size": config.train.batch_size,
      "dtype": config.train.dtype,
      "devices": n_dev,
      "device_kind": jax.devices()[0].device_kind,
      "compile_s": cold["total_s"],
      "compile_warm_s": warm["total_s"],
      "trace_s": cold["trace_s"],
      "xla_compile_s": cold["xla_s"],
      "trace_warm_s": warm["trace_s"],
      "xla_compile_warm_s": warm["xla_s"],
      "compile_cpu_s": cold["cpu_s"],
      "compile_warm_cpu_s": warm["cpu_s"],
      "cache_hit_warm": warm["cache_hits"] > 0 and warm["cache_misses"] == 0,
      "peak_bytes_per_device": memory.get("peak_bytes_per_device"),
      "step_s": round(step_s, 5),
      "images_per_s": round(config.train.batch_size / step_s, 1),
      "flops_per_step": flops,
      "tflops_per_s": round(flops / step_s / 1e12, 4),
      "peak_tflops_per_device": round(peak / 1e12, 3),
      "peak_source": peak_source,
      "mfu": round(flops / step_s / (peak * n_dev), 4),
      "loss": float(metrics["loss"]),
      "steps": steps,
      "data": config.data.source,
      **extra,
      **({"input_over_step": round(extra["input_images_per_s"]
                                   / (config.train.batch_size / step_s), 2)}
         if extra else {}),
  }


def main(argv):
  del argv
  from selfsup.errors import UserError
  config = flags.FLAGS.config
  if config is None:
    raise UserError("usage: python -m selfsup.bench --config experiments/NAME.py[:ARG] "
                    "[--steps N] [--data synthetic|config|SOURCE]")
  if flags.FLAGS.steps < 1:
    raise UserError(f"--steps must be >= 1 (timed steps), got {flags.FLAGS.steps}")
  config.unlock()
  config.train.progress_bar = False
  with_data(config, flags.FLAGS.data)
  if flags.FLAGS.input_only:
    print(json.dumps(benchmark_input(config, flags.FLAGS.input_batches)))
    return
  input_batches = flags.FLAGS.input_batches if flags.FLAGS.input else 0
  print(json.dumps(benchmark(config, flags.FLAGS.steps, input_batches)))


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
