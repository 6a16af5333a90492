"""Shared test fixtures: tiny configs that train in seconds on one CPU core."""

import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Many tests build the same tiny trainer and compile the same step; XLA's persistent
# cache (keyed by the computation, the JAX version and the backend) lets the second one
# load the executable instead of compiling it. Set as environment variables before JAX is
# imported, so xdist workers and CLI subprocesses share it. Tracing still happens, so the
# compile-once test still counts traces.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "selfsup-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def tiny_config(objectives="rotation", steps=6, batch_size=16, image_size=16):
  """A config small enough for a unit test: tiny CNN, 16x16 synthetic shapes."""
  from experiments.quickstart import get_config
  c = get_config(objectives)
  c.data.image_size = image_size
  c.train.steps = steps
  c.train.batch_size = batch_size
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.progress_bar = False
  c.optimizer.warmup_steps = 0
  c.probe.enabled = False
  c.encoder = {"name": "tiny_cnn", "width_multiplier": 0.5}
  return c


@pytest.fixture
def tiny():
  return tiny_config


def run_cli(args, env_extra=None, timeout=300):
  """Runs `python -m ...` in a subprocess from the repository root."""
  import subprocess
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.update(env_extra or {})
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def model_forward(config, batch_size=8, train=True):
  """Builds the config's PretextModel, initialises it on a random uint8 batch and runs
  one forward pass; returns (apply, variables, batch, (loss, metrics, host))."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from selfsup.model import build_model
  model = build_model(config)
  size = config.data.image_size
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (batch_size, size, size, 3)),
                                jnp.uint8),
           "label": jnp.zeros((batch_size,), jnp.int32), "index": jnp.arange(batch_size)}
  variables = jax.jit(model.init)(
      {"params": jax.random.key(0), "augment": jax.random.key(1)}, batch)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  outputs, _ = apply(variables, batch, train=train, rngs={"augment": jax.random.key(2)},
                     mutable=("batch_stats", "objective_state"))
  return apply, variables, batch, outputs


def run_script_json(template: str, timeout: int = 1200) -> dict:
  """Runs a Python script in a fresh CPU process and returns its last stdout line as JSON.

  `template` is formatted with `root` (the repository) and `tests` (this folder), so the
  script can put both on sys.path after setting XLA_FLAGS (e.g. 8 fake devices) before
  JAX is imported, which only a new process allows.
  """
  import json
  import subprocess
  import sys
  script = template.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
