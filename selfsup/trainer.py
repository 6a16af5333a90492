"""The trainer: build everything from a config, then run the jitted step in a loop.

`Trainer(config, workdir)` checks and locks the workdir, then builds the mesh, data
source and pipeline, encoder, objectives, optimizer and the sharded train state (restored
from the newest readable checkpoint in `workdir` when there is one; damaged newer ones
are moved aside with a message). `train_step(state, batch, *, model, tx, lr_schedule)`
is one module-level pure function: augmentation, encoder, heads, loss, gradients,
optimizer update, objectives' post-update. The trainer binds it with `functools.partial`
and jits it with donated state as `Trainer.step_fn` (the bench times the same function).
`Trainer.run()` loops, logs, runs host hooks and checkpoints (also on SIGTERM, for
preemption).

Divergence: the step checks on the device that the loss, the gradients and the updated
parameters are finite; if not, it keeps the previous parameters, optimizer and
objective state (the update is not applied) and counts the step. The host reads the
count only where it syncs anyway (logging, checkpoints): `train.on_nonfinite=stop` ends
the run there with one line, before any save; `skip` carries on and logs
`nonfinite_steps`, and stops only after MAX_CONSECUTIVE_SKIPS non-finite steps in a row.
So no checkpoint ever holds a non-finite value.
"""

import collections
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from objectives.base import HostContext
from selfsup import checkpoint as ckpt_lib
from selfsup import config as config_lib
from selfsup import data as data_lib
from selfsup import distributed, optim, sharding
from selfsup.errors import UserError
from selfsup.metrics_log import MetricsLogger, read_metrics
from selfsup.model import build_model
from selfsup.workdir import (WorkdirLock, check_workdir_config, prepare_workdir,
                             save_config)

MAX_CONSECUTIVE_SKIPS = 50

# Steps the host may dispatch ahead of the device. Dispatch is asynchronous, and between
# two log or checkpoint steps nothing else makes the loop wait, so without a bound it can
# run up to `log_every` steps ahead; a SIGTERM is then seen many steps before the device
# gets there, and the save waits for all of them. That took several minutes with a 17 s
# step at log_every 30, far more than a preemption grace period. Two keep the device fed
# (the next step is queued while one runs) and bound that wait to two steps.
STEPS_IN_FLIGHT = 2


class NonFiniteError(UserError):
  """The loss or the gradients stopped being finite (the run diverged)."""


def _micro_batches(batch, k):
  """(B, ...) -> (k, B/k, ...): micro-batch i holds rows i, i+k, i+2k, ... so that each
  one stays spread over every data-parallel device (rows are laid out device-major)."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _merge_micro(x):
  """The inverse of `_micro_batches` for per-example outputs: (k, B/k, ...) -> (B, ...)."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def train_step(state, batch, *, model, tx, lr_schedule, accumulate: int = 1):
  """One optimisation step: (state, batch) -> (new state, metrics, host outputs).

  Pure; bound to a model, optimizer and schedule with functools.partial and jitted by the
  Trainer. A step whose loss, gradients or updated parameters are not finite leaves the
  state as it was (apart from the step counter) and sets metrics["nonfinite"] = 1.

  accumulate = K > 1: the global batch runs as K micro-batches of B/K (a `lax.scan`, so
  one micro-batch's activations are live at a time); the gradients and metrics are the
  mean over micro-batches and one optimizer update follows. BatchNorm statistics and
  contrastive negatives are those of each micro-batch (B/K examples, over all devices),
  running BatchNorm averages and objective state are updated micro-batch after
  micro-batch, and micro-batch i draws its augmentations from fold_in(rng, i): so K > 1
  matches K = 1 only for objectives without batch-coupled terms.
  """
  step = state["step"]
  rng = jax.random.fold_in(state["rng"], step)

  def loss_fn(params, batch_stats, objective_state, batch, rng):
    variables = {"params": params, "batch_stats": batch_stats,
                 "objective_state": objective_state}
    (loss, metrics, host), updates = model.apply(
        variables, batch, train=True, step=step, rngs={"augment": rng},
        mutable=["batch_stats", "objective_state"])
    return loss, (metrics, host, updates)

  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accumulate == 1:
    grads, (metrics, host, updates) = grad_fn(
        state["params"], state["batch_stats"], state["objective_state"], batch, rng)
  else:
    def micro(carry, xs):
      grad_sum, batch_stats, objective_state = carry
      i, mb = xs
      g, (m, h, up) = grad_fn(state["params"], batch_stats, objective_state, mb,
                              jax.random.fold_in(rng, i))
      carry = (jax.tree.map(jnp.add, grad_sum, g), up.get("batch_stats", batch_stats),
               up.get("objective_state", objective_state))
      return carry, (m, h)

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (grad_sum, batch_stats, objective_state), (metrics, host) = jax.lax.scan(
        micro, (zeros, state["batch_stats"], state["objective_state"]),
        (jnp.arange(accumulate), _micro_batches(batch, accumulate)))
    grads = jax.tree.map(lambda g: g / accumulate, grad_sum)
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    host = jax.tree.map(_merge_micro, host)
    updates = {"batch_stats": batch_stats, "objective_state": objective_state}
  param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = dict(optax.apply_updates(state["params"], param_updates))
  for name, template in zip(model.names, model.objectives):
    if name in params:  # e.g. SwAV's prototypes: re-normalised, frozen at first
      params[name] = template.post_update_params(params[name], state["params"][name], step)
  objective_state = dict(updates.get("objective_state", state["objective_state"]))
  for name, template in zip(model.names, model.objectives):
    if name in objective_state:
      objective_state[name] = template.post_update(objective_state[name], params, step)
  metrics = dict(metrics)
  metrics["loss"] = metrics["pretext_loss"]
  metrics["lr"] = lr_schedule(step)
  grad_norm = optax.global_norm(grads)
  metrics["grad_norm"] = grad_norm
  metrics["param_norm"] = optax.global_norm(params["encoder"])
  # Three scalar reductions: cheap next to the step, and no host sync.
  finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            & jnp.isfinite(optax.global_norm(params)))
  metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = {
      "step": step + 1,
      "params": keep_if_finite(params, state["params"]),
      "batch_stats": keep_if_finite(updates.get("batch_stats", state["batch_stats"]),
                                    state["batch_stats"]),
      "objective_state": keep_if_finite(objective_state, state["objective_state"]),
      "opt_state": keep_if_finite(opt_state, state["opt_state"]),
      "rng": state["rng"]}
  return new_state, metrics, host


@jax.jit
def _count_nonfinite(counts, nonfinite):
  """(since the last check, in a row, total) counters, updated on the device."""
  window, streak, total = counts
  return (window + nonfinite, jnp.where(nonfinite > 0, streak + 1, 0), total + nonfinite)


def compile_cache_dir(setting: str, workdir: str | None) -> str | None:
  """The persistent compilation cache folder config.train.compile_cache names (None: off)."""
  if setting == "off":
    return None
  if setting == "user":
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
      return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "selfsup", "jax")
  if setting == "workdir":
    return None if workdir is None else os.path.join(workdir, "jax_cache")
  return os.path.expanduser(setting)


def setup_compile_cache(setting: str, workdir: str | None) -> str | None:
  """Points JAX's persistent compilation cache at that folder (or turns it off).

  A repeated or resumed run then loads the compiled step (keyed by the program, the JAX
  version and the devices) instead of compiling it. Takes effect only before this
  process's first cached compilation. Returns the folder (None: off).
  """
  path = compile_cache_dir(setting, workdir)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create the compilation cache folder {path} ({e.strerror}); set "
                    "train.compile_cache to another folder, or off") from e
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


# The jitted `init` is almost all random-number generation (a threefry kernel per
# parameter); the forward pass it traces is dead code. On CPU, LLVM's optimisation of
# those kernels is most of its compile (ResNet-50: 24 of 26 CPU s) and level 1 halves it
# with bit-identical parameters (checked on ResNet-50 and in tests/test_trainer.py) and
# the same run time. It runs once, so nothing else is traded. Other backends: unchanged.
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


GIB = 2**30


def step_memory(compiled) -> dict:
  """Bytes per device of a compiled step, from XLA's memory analysis (empty if none).

  peak_bytes_per_device = arguments + outputs - donated (aliased) + temporaries: what
  the step holds on each device at its peak, state included.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend analyses memory
    m = None
  if m is None:
    return {}
  if isinstance(m, (list, tuple)):
    m = m[0]
  out = {k: int(getattr(m, f"{k}_in_bytes", 0) or 0)
         for k in ("argument_size", "output_size", "alias_size", "temp_size",
                   "generated_code_size")}
  out["peak_bytes_per_device"] = (out["argument_size"] + out["output_size"]
                                  - out["alias_size"] + out["temp_size"])
  return out


def device_memory_limit() -> int | None:
  """Bytes one device may use, where the backend reports it (GPU, TPU; not CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def check_fits(memory: dict, limit: int | None, config) -> str:
  """One line about the step's memory; a UserError when it cannot fit the device."""
  if not memory:
    return "compiled step: no memory analysis on this backend"
  peak = memory["peak_bytes_per_device"]
  line = (f"compiled step: {peak / GIB:.2f} GiB per device (state and batch "
          f"{memory['argument_size'] / GIB:.2f}, temporaries {memory['temp_size'] / GIB:.2f})"
          + (f" of {limit / GIB:.1f} GiB" if limit else ""))
  if limit and peak > limit:
    raise UserError(
        f"the batch cannot fit: the compiled step needs {peak / GIB:.2f} GiB per device and "
        f"the device has {limit / GIB:.2f} GiB (train.batch_size={config.train.batch_size}); "
        f"set train.remat=blocks or full (now {config.train.remat}), train.accumulate=K "
        f"micro-batches (now {config.train.accumulate}), mesh.sharding=fsdp, or a smaller "
        "batch")
  return line


class Trainer:
  def __init__(self, config, workdir: str | None, *, devices=None,
               async_checkpoints: bool = True):
    """workdir=None builds everything but checkpoints and logs (benchmarks, notebooks)."""
    config_lib.validate(config)
    self.config = config
    self.workdir = workdir
    self.compile_cache = setup_compile_cache(config.train.compile_cache, workdir)
    self._compiled = None       # the step compiled ahead by run() (memory check)
    self.lock = None
    self.preempted = False      # run() stopped on SIGTERM before train.steps
    self.skipped_checkpoints = []
    if workdir is not None:
      prepare_workdir(workdir)
      if jax.process_index() == 0:
        self.lock = WorkdirLock.acquire(workdir)
      try:
        check_workdir_config(workdir, config)
        self._build(config, workdir, devices, async_checkpoints)
      except BaseException:
        self.close()
        raise
    else:
      self._build(config, workdir, devices, async_checkpoints)

  def close(self) -> None:
    """Releases the workdir lock (also done at the end of run())."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None

  def _build(self, config, workdir, devices, async_checkpoints):
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.model, devices)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    data_ways = self.mesh.shape["data"]
    if config.train.batch_size % data_ways:
      raise UserError(f"config.train.batch_size={config.train.batch_size} does not divide over "
                      f"the {data_ways} data-parallel devices; use a multiple of {data_ways}")
    k = config.train.accumulate
    if config.train.batch_size % (k * data_ways):
      raise UserError(f"config.train.accumulate={k} micro-batches of the batch "
                      f"{config.train.batch_size} do not divide over the {data_ways} "
                      f"data-parallel devices; the batch must be a multiple of {k * data_ways}")

    self.source = data_lib.make_source(
        config.data.source, config.data.train_split, image_size=config.data.image_size,
        strict=config.data.strict, data_dir=config.data.data_dir or None)
    self.model = build_model(config, self.source.num_classes if config.train.online_probe else 0,
                             dataset_size=len(self.source))
    for template in self.model.objectives:
      if template.needs_stable_indices and not getattr(self.source, "stable_indices", False):
        raise UserError(f"objective {type(template).__name__} needs a source with stable "
                        f"example indices; {config.data.source} has none")
      template.validate(image_size=config.data.image_size, dataset=self.source,
                        batch_size=config.train.batch_size)

    extra_groups = {}
    for name, template in zip(self.model.names, self.model.objectives):
      for label, (predicate, builder) in template.optimizer_groups().items():
        extra_groups[f"{name}/{label}"] = (
            lambda path, n=name, p=predicate: path[0] == n and p(path[1:]), builder)
    self.tx, self.lr_schedule = optim.build_optimizer(
        config.optimizer, batch_size=config.train.batch_size, total_steps=config.train.steps,
        extra_groups=extra_groups)
    self._init_state()
    self.iterator = self._make_iterator()
    self.checkpointer = None
    if workdir is not None:
      # Orbax's first collective sets up CPU collectives (gloo), which give up when the
      # processes arrive over 30 s apart (one compiled `init`, another loaded it).
      distributed.barrier("state initialised")
      self.checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                keep=config.train.keep_checkpoints,
                                                async_save=async_checkpoints)
      step, state, data_state, skipped = self.checkpointer.restore_newest(
          ckpt_lib.abstract_like(self.state))
      self.skipped_checkpoints = skipped
      for bad, reason in skipped:
        optim.warn(f"checkpoint step {bad} in {self.checkpointer.directory} is damaged "
                   f"({reason}); moved it to {self.checkpointer.directory}.damaged/ and "
                   f"resumed from step {step}")
      if step is not None:
        self.state = state
        data_lib.restore_iterator_state(self.iterator, data_state["iterator"])
      save_config(workdir, config)
    self.step_fn = self._make_step()

  # ---- state -----------------------------------------------------------------------
  def _dummy_batch(self, n):
    s = config_lib.canvas_size(self.config)
    return {"image": jnp.zeros((n, s, s, 3), jnp.uint8), "label": jnp.zeros((n,), jnp.int32),
            "index": jnp.arange(n, dtype=jnp.int32),
            "valid": jnp.tile(jnp.array([0, 0, s, s], jnp.int32), (n, 1))}

  def _init_state(self):
    config = self.config

    def init(rng):
      k_param, k_aug, k_train = jax.random.split(rng, 3)
      variables = self.model.init({"params": k_param, "augment": k_aug},
                                  self._dummy_batch(2), train=True, step=0)
      params = variables["params"]
      return {
          "step": jnp.zeros((), jnp.int32),
          "params": params,
          "batch_stats": variables.get("batch_stats", {}),
          "objective_state": variables.get("objective_state", {}),
          "opt_state": self.tx.init(params),
          "rng": k_train,
      }

    strategy, min_size = config.mesh.sharding, config.mesh.fsdp_min_size

    def state_shardings(abstract):   # from shapes only
      shardings = {k: sharding.tree_shardings(v, self.mesh, strategy, min_size)
                   for k, v in abstract.items()}
      # Large objective tables (NAT's per-example targets) are split over "data" always.
      shardings["objective_state"] = sharding.tree_shardings(
          abstract["objective_state"], self.mesh, "fsdp", min_size)
      shardings["step"] = sharding.replicated(self.mesh)
      shardings["rng"] = sharding.replicated(self.mesh)
      return shardings

    # One trace of `init` (tracing runs the whole model forward on a dummy batch): the
    # shardings come from the traced shapes and are applied as a constraint, instead of
    # a jax.eval_shape trace first and a second trace with out_shardings.
    def sharded_init(rng):
      state = init(rng)
      return jax.lax.with_sharding_constraint(state, state_shardings(state))

    rng = jax.random.PRNGKey(config.seed)
    with jax.sharding.use_mesh(self.mesh) if hasattr(jax.sharding, "use_mesh") else self.mesh:
      lowered = jax.jit(sharded_init).trace(rng).lower()
      compiled = lowered.compile(
          compiler_options=INIT_COMPILER_OPTIONS.get(jax.default_backend()) or None)
      self.state = compiled(rng)
    # The shardings as the arrays carry them (equivalent to what state_shardings gave, but
    # spelled as XLA returns them, e.g. P() for P(None,)): the step's out_shardings must
    # match its inputs' exactly, or its second call compiles again.
    self.state_shardings = jax.tree.map(lambda a: a.sharding, self.state)

  def _make_iterator(self):
    # Each process reads the rows of every global batch that its devices hold, out of
    # one global order: the batch at each step does not depend on the process count.
    c = self.config
    rows = sharding.process_rows(self.batch_sharding, c.train.batch_size)
    clusters = None
    if c.data.order == "cluster_balanced":
      clusters = data_lib.load_clusters(c.data.cluster_file, len(self.source))
    return data_lib.make_pipeline(
        self.source, batch_size=c.train.batch_size, image_size=c.data.image_size, seed=c.seed,
        shuffle=True, num_workers=c.data.num_workers, prefetch=c.data.prefetch,
        canvas_size=config_lib.canvas_size(c), process_rows=rows, clusters=clusters)

  # ---- the step --------------------------------------------------------------------
  def _make_step(self):
    """The jitted step: train_step bound to this model/optimizer, state donated."""
    step = functools.partial(train_step, model=self.model, tx=self.tx,
                             lr_schedule=self.lr_schedule,
                             accumulate=self.config.train.accumulate)
    return jax.jit(step, donate_argnums=(0,), out_shardings=(self.state_shardings, None, None))

  def shard_batch(self, batch: dict) -> dict:
    keep = {k: np.asarray(v) for k, v in batch.items()
            if k in ("image", "label", "index", "valid")}
    n = self.config.train.batch_size
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v,
                                                      (n,) + v.shape[1:])
            for k, v in keep.items()}

  def train_step(self, batch):
    """One step on a host batch; returns the metrics (device arrays) and host outputs."""
    step = self._compiled or self.step_fn
    self.state, metrics, host = step(self.state, self.shard_batch(batch))
    return metrics, host

  def compile_step(self, batch: dict):
    """Compiles the step for this (host) batch ahead of time; returns (compiled, memory).

    Raises UserError when the step needs more memory per device than the backend
    reports (`check_fits`); run() prints the memory line at start-up.
    """
    sharded = self.shard_batch(batch)
    compiled = self.step_fn.lower(self.state, sharded).compile()
    memory = step_memory(compiled)
    self.memory_line = check_fits(memory, device_memory_limit(), self.config)
    return compiled, memory

  # ---- the loop --------------------------------------------------------------------
  def run(self, *, stop_after: int | None = None) -> dict:
    """Trains to config.train.steps; returns the last logged metrics.

    On a finished run this trains nothing and returns the last row of metrics.jsonl
    (`self.finished_before` tells the caller). After SIGTERM it saves, stops, and sets
    `self.preempted`. stop_after: stop (without a final checkpoint, as a crash would)
    once this many steps ran in this call; used to test resumption.
    """
    if self.workdir is None:
      raise ValueError("Trainer.run needs a workdir (metrics and checkpoints go there); "
                       "use train_step() to drive a Trainer built without one")
    c = self.config
    total = c.train.steps
    start = int(jax.device_get(self.state["step"]))
    self.start_step = start
    self.finished_before = start >= total
    if self.finished_before:
      self.close()
      rows = read_metrics(self.workdir) if os.path.exists(
          os.path.join(self.workdir, "metrics.jsonl")) else []
      return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
    if self.lock is None and jax.process_index() == 0:
      self.lock = WorkdirLock.acquire(self.workdir)   # run() again on the same Trainer
    logger = MetricsLogger(self.workdir, total_steps=total, start_step=start,
                           progress_bar=c.train.progress_bar)
    hooked = [(n, t) for n, t in zip(self.model.names, self.model.objectives) if t.has_host_hook]
    ctx = HostContext(steps_per_epoch=max(1, len(self.source) // c.train.batch_size),
                      dataset_size=len(self.source))
    preempted = {"flag": False}
    previous = None
    try:
      previous = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
    except ValueError:  # not the main thread
      pass
    last = {}
    window_start, window_images = time.perf_counter(), 0
    ran = 0
    zero = jnp.zeros((), jnp.int32)
    counts = (zero, zero, zero)
    self._checked = start
    failing = True
    watchdog = distributed.PeerWatchdog()   # several processes: a dead one stops the rest
    in_flight = collections.deque()
    try:
      for step in range(start, total):
        batch = next(self.iterator)
        if self._compiled is None:
          self._compiled, _ = self.compile_step(batch)
          logger.message(self.memory_line)
          distributed.barrier("step compiled")   # hosts start the first step together
        metrics, host = self.train_step(batch)
        in_flight.append(metrics["loss"])
        if len(in_flight) > STEPS_IN_FLIGHT:
          jax.block_until_ready(in_flight.popleft())
        counts = _count_nonfinite(counts, metrics["nonfinite"])
        if hooked:
          self._run_host_hooks(hooked, host, step, ctx)
        window_images += c.train.batch_size
        ran += 1
        done = step + 1
        stop = preempted["flag"]   # read once: a signal arriving later is seen next step
        save_now = done % c.train.checkpoint_every == 0 or done == total or stop
        if done % c.train.log_every == 0 or done == total:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - window_start
          last = {k: float(v) for k, v in metrics.items() if k != "nonfinite"}
          last["images_per_s"] = window_images / max(elapsed, 1e-9)
          last["nonfinite_steps"] = int(counts[0])
          logger.log(done, last)
          window_start, window_images = time.perf_counter(), 0
          counts = self._check_nonfinite(done, counts, logger)
        elif save_now:
          counts = self._check_nonfinite(done, counts, logger)
        if c.train.image_every and (done % c.train.image_every == 0 or done == total):
          self.write_images(done, batch, logger)
        logger.advance(done)
        if stop_after is not None and ran >= stop_after:
          failing = False
          return last
        if save_now:
          self.save(done)
        if stop and done < total:
          self.preempted = True
          logger.message(f"SIGTERM: saved step {done} of {total}; the run is incomplete: "
                         "rerun the same command to resume")
          break
      failing = False
    except Exception as e:  # noqa: BLE001 - only a lost peer is handled here
      message = distributed.stop_message(e)
      if message is None:
        raise
      # Another process died: the collectives cannot complete and JAX's shutdown would
      # wait for the dead process, so say so and end this process now. The checkpoints
      # already written are complete (orbax renames a step folder only when done).
      import sys
      print(message, file=sys.stderr, flush=True)
      os._exit(3)
    finally:
      watchdog.stop()
      try:
        self.checkpointer.wait()
      except Exception:  # noqa: BLE001 - do not hide the error already on its way out
        if not failing:
          raise
      finally:
        logger.close()
        self.close()
        if previous is not None:
          signal.signal(signal.SIGTERM, previous)
    return last

  def _check_nonfinite(self, done, counts, logger):
    """Reads the device counters (where the loop syncs anyway); stops or warns."""
    window, streak, total = (int(x) for x in jax.device_get(counts))
    since, self._checked = self._checked, done
    if not window:
      return counts
    mode = self.config.train.on_nonfinite
    if mode == "stop" or streak >= MAX_CONSECUTIVE_SKIPS:
      self.checkpointer.wait()
      newest = self.checkpointer.latest_step()
      kept = f"the newest checkpoint is step {newest}" if newest is not None else "no checkpoint"
      why = ("train.on_nonfinite=stop" if mode == "stop" else
             f"{streak} non-finite steps in a row with train.on_nonfinite=skip")
      raise NonFiniteError(
          f"the run diverged: non-finite loss or gradients in {window} of steps "
          f"{since + 1}-{done} (stopped: {why}); those updates were not applied and "
          f"{kept}, with finite values; lower optimizer.lr (now {self.config.optimizer.lr}) "
          "or set optimizer.grad_clip, then rerun"
          + (", or set train.on_nonfinite=skip to skip such steps" if mode == "stop" else ""))
    logger.message(f"warning: skipped {window} step(s) with non-finite loss or gradients in "
                   f"steps {since + 1}-{done} (train.on_nonfinite=skip; {total} so far)")
    return (jnp.zeros_like(counts[0]),) + tuple(counts[1:])

  def write_images(self, step: int, batch, logger, count: int = 8) -> None:
    """Objectives with pictures (`Objective.images`): a PNG grid of the first `count`
    examples of the global batch, in eval mode, outside the jitted step (every process
    calls it; process 0 writes)."""
    if not any(t.has_images for t in self.model.objectives):
      return
    if not hasattr(self, "_images_fn"):
      from objectives.base import objective_images

      def images(variables, batch, key):  # the global batch's first examples, every host
        small = {k: batch[k][:count] for k in ("image", "valid") if k in batch}
        return objective_images(self.model, variables, small, key)
      self._images_fn = jax.jit(images, out_shardings=sharding.replicated(self.mesh))
    variables = {k: self.state[k] for k in ("params", "batch_stats", "objective_state")}
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
    grids = self._images_fn(variables, self.shard_batch(batch), key)
    for name, grid in jax.device_get(grids).items():
      logger.image(step, name, grid)

  def save(self, step: int) -> None:
    self.checkpointer.save(
        step, self.state, {"iterator": data_lib.iterator_state_to_json(self.iterator)},
        force=True)
    if jax.process_count() > 1:
      # Several processes: finish the save before the next step's collectives, so that
      # no collective of orbax's background thread interleaves with them.
      self.checkpointer.wait()

  def _run_host_hooks(self, hooked, host, step, ctx):
    # Hooks get the device arrays, not host copies: NumPy converts what a hook reads
    # (np.asarray), so a hook with nothing to do this step costs no transfer and no sync,
    # and one that reads a few rows of a large per-example table (~10 GB on ImageNet)
    # fetches only those rows. What a hook returns goes back with the state's shardings.
    state = self.state
    objective_state = dict(state["objective_state"])
    for name, template in hooked:
      local = objective_state[name]
      new = template.host_update(local, host.get(name), step, ctx)
      if new is not local:   # NumPy leaves are identical on every process (see the hook)
        objective_state[name] = jax.tree.map(
            distributed.put_global, new, self.state_shardings["objective_state"][name])
    state["objective_state"] = objective_state


def train(config, workdir: str, **kwargs) -> dict:
  """Python API: trains (or resumes) a run in `workdir`; returns the last metrics."""
  return Trainer(config, workdir, **kwargs).run()
