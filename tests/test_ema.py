"""The shared EMA teacher helper: cosine momentum and the mirror-following update."""

import math

import jax.numpy as jnp
import numpy as np

from objectives import ema


def test_cosine_momentum_runs_from_base_to_one():
  total = 100
  got = [float(ema.cosine_momentum(t, total, 0.99)) for t in (0, 25, 50, 100, 150)]
  want = [1 - 0.01 * (math.cos(math.pi * min(t / total, 1)) + 1) / 2
          for t in (0, 25, 50, 100, 150)]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert got[0] == np.float32(0.99) and got[-1] == 1.0


def test_update_follows_the_mirrored_paths_only():
  rng = np.random.default_rng(0)
  params = {"encoder": {"conv": {"kernel": rng.normal(size=(3, 3)).astype(np.float32)}},
            "pixpro": {"projector": {"bias": rng.normal(size=(4,)).astype(np.float32)},
                       "ppm": {"kernel": rng.normal(size=(2,)).astype(np.float32)}},
            "probe": {"kernel": rng.normal(size=(5,)).astype(np.float32)}}
  teacher = ema.merge(ema.mirror(("encoder",), {"conv": {"kernel": np.zeros((3, 3))}}),
                      ema.mirror(("pixpro", "projector"), {"bias": np.ones(4)}))
  assert set(teacher) == {"encoder", "pixpro"} and set(teacher["pixpro"]) == {"projector"}
  new = ema.ema_update(teacher, params, 0.9)
  np.testing.assert_allclose(new["encoder"]["conv"]["kernel"],
                             0.1 * params["encoder"]["conv"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(new["pixpro"]["projector"]["bias"],
                             0.9 + 0.1 * params["pixpro"]["projector"]["bias"], rtol=1e-6)
  assert set(new["pixpro"]) == {"projector"}          # the PPM and the probe are not followed
  assert new["encoder"]["conv"]["kernel"].dtype == jnp.float32
  # Momentum 1 keeps the teacher; momentum 0 copies the student.
  same = ema.ema_update(teacher, params, 1.0)
  np.testing.assert_array_equal(same["pixpro"]["projector"]["bias"], np.ones(4))
  copy = ema.ema_update(teacher, params, 0.0)
  np.testing.assert_allclose(copy["pixpro"]["projector"]["bias"],
                             params["pixpro"]["projector"]["bias"], rtol=1e-6)
