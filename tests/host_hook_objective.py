"""A toy objective with a host hook, for the multi-process tests (not a test module).

No shipped objective uses `host_update` now (NAT's reassignment runs in its step), but
the seam stays for work that cannot be jitted (a SciPy solver, k-means on the host). This
objective uses every part of it the way such work would, so that the 2-process test
covers it: a per-example table in `objective_state`, the batch's rows of that table read
on the host with `distributed.RowReader`, the step's per-example outputs gathered with
`distributed.to_host`, a NumPy update, and the new table put back by the trainer. The
loss reads the table, so a wrong or process-dependent update changes the training, and
`seen` counts every row's visits, so a lost or doubled update shows in the state.

`register()` adds it to `objectives.REGISTRY` as `host_memory` (the worker processes and
the test process each call it before building a config).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import objectives
from objectives.base import Objective, ObjectiveOutput
from selfsup import augment, distributed

NAME = "host_memory"


class HostMemory(Objective):
  """Pulls each example's mean feature toward its running mean kept on the host side."""
  image_size: int = 32
  dataset_size: int = 0
  decay: float = 0.5   # memory <- decay * memory + (1 - decay) * feature, on the host
  needs_stable_indices = True
  has_host_hook = True

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    out = encoder(augment.eval_view(batch, self.image_size), train=train)
    feature = jnp.mean(out.pooled, axis=-1)
    rows = max(1, self.dataset_size)
    memory = self.variable("objective_state", "memory", jnp.zeros, (rows,), jnp.float32)
    seen = self.variable("objective_state", "seen", jnp.zeros, (rows,), jnp.int32)
    target = jax.lax.stop_gradient(memory.value[batch["index"]])
    loss = jnp.mean(jnp.square(feature - target))
    return ObjectiveOutput(loss=loss, metrics={"visits": jnp.sum(seen.value)},
                           probe_features=out.pooled,
                           host={"index": batch["index"], "feature": feature})

  def host_update(self, state, host, step, ctx):
    del step, ctx
    index = distributed.to_host(host["index"])         # the global batch, every process
    feature = distributed.to_host(host["feature"])
    old = distributed.RowReader(state["memory"])[index]  # only these rows travel
    memory = distributed.to_host(state["memory"]).copy()
    seen = distributed.to_host(state["seen"]).copy()
    # Repeated indices: the last occurrence wins, in the global batch order, which is
    # the same on every process.
    memory[index] = self.decay * old + (1.0 - self.decay) * feature
    np.add.at(seen, index, 1)
    return {"memory": memory, "seen": seen}


def register():
  objectives.REGISTRY[NAME] = f"{__name__}:HostMemory"
