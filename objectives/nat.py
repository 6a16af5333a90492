"""Noise As Targets (Bojanowski & Joulin 2017, "Unsupervised Learning by Predicting
Noise", ICML 2017, arXiv:1704.05310).

Every training image owns one fixed target: a point drawn once, uniformly on the unit
sphere of dimension d, before training. The encoder's L2-normalised features are pulled
towards their image's target with a square loss. Fixed, spread-out targets keep the
features from collapsing; which image owns which target is learned: every few epochs,
for the batch at hand, the batch's targets are redistributed among the batch's images by
an optimal one-to-one assignment (Hungarian algorithm) that brings each feature to the
closest available target. Only targets already held by the batch move, so the assignment
stays a permutation of the whole target table.

In this module, top to bottom:
- view: one light random crop + flip per image, in grayscale (`grayscale_prob=1`);
- head: a linear projection of the pooled features (`proj_dim`, default 128; 0 aligns
  the pooled features themselves), then L2 normalisation (see "Projection" below);
- loss: mean squared distance ||z - c||^2 = 2 - 2 z.c to the assigned target;
- state: `targets` (dataset_size, d) and `assignment` (dataset_size,) in the
  `objective_state` collection (checkpointed; sharded over `data` by the trainer);
- reassignment, in the jitted step before the loss: the Hungarian algorithm
  (`optax.assignment.hungarian_algorithm`, cost -z.c) on the batch's features and held
  targets, on reassignment epochs (every `reassign_every_epochs`, 3 in the paper) or
  every `reassign_every_steps` steps when that is set (short runs); `reassign` is the
  same step in NumPy/SciPy, the tests' reference.

Reassignment as in the paper's Algorithm 1: the step computes the batch's features,
deals the batch's held targets out again among its images to the features (stop
gradient), writes the new assignment into `objective_state`, and takes the gradient of
the loss against the NEW targets, so a reassignment acts in its own step and not only
when the images come round again (which they never do in a run shorter than an epoch).
Under jit over a batch split across devices the global batch is one problem (the cost
matrix is gathered, every device runs the same solve), so 8 devices give 1 device's
assignment. A batch that wraps round an epoch boundary holds an index twice: the first
occurrence takes part, later ones are kept out of the problem and are not written; their
loss uses their image's new target. With `train.accumulate` = K each micro-batch is its
own problem. Cost: one jitted Hungarian on a 2-core CPU (shared with other jobs)
takes about 2 ms at batch 128 and 16 ms at batch 256 (cubic in the batch; scipy takes
about 5 ms for either; not measured on an accelerator, where the solve's sequential
loops run no faster); on steps outside the reassignment epochs a `lax.cond` skips it.

Projection (on by default): the pooled features of our encoders come out of a ReLU and
an average pool, so they are non-negative, while the targets are isotropic on the sphere.
A non-negative unit vector z and a target c uniform on the sphere have z.c <= ||c_+||
(the norm of c's positive part), about 1/sqrt(2) = 0.71 in high dimension, so with
`proj_dim=0` the loss 2 - 2 z.c cannot fall below about 0.59 and about half of every
target cannot be matched. In the paper the aligned representation is the output of the
network's last layer, which is a linear (fully connected) layer, not a rectified pooled
map (AlexNet in the paper: features on the l2 sphere after the final linear layer); a
linear layer on the pooled features is the same construction here and lets z reach any
point of the sphere.

Differences from the paper, on purpose: the paper's fixed Sobel first layer (grayscale
gradients instead of RGB) is not built in: it would change the encoder's input and
thereby every evaluation of it. Grayscale views stand in for its colour removal: with
colour, an image's colours alone pick out its target, and the encoder learns colour
instead of shape.

Reference setting: AlexNet with a fixed Sobel input layer, d = 4096 features, plain SGD
lr 0.01, batch 256, reassignment every 3 epochs, ImageNet. There is no anchor for NAT in
OBJECTIVES.md, and none is published for the ResNet settings of `experiments/nat_*.py`.

Measured with and without the projection, when the reassignment still ran on the host
after the step (tiny CNN of the quickstart, AdamW 2e-3,
CIFAR-10 JPEG folders, 2-core CPU; `python -m selfsup.train --config
experiments/quickstart.py:nat --workdir W --config.data.source=folder:/work/data/cifar10
--config.objectives.nat.proj_dim=P` plus the overrides named):

| setting | proj_dim = 128 (default) | proj_dim = 0 (previous) |
|---|---|---|
| 64 images, no crop / flip, batch 32, 600 steps: final loss (cos) | 0.014 (0.993) | 0.636 (0.682) |
| 256 images, 300 steps (150 epochs): final loss (cos) | 1.20 (0.40) | 1.50 (0.25) |
| quickstart, 300 steps on all 50,000: probe top-1 (random-init 33.95) | 37.05 | 34.80 |

(first row: `--config.data.train_split=train[:64] --config.train.batch_size=32
--config.train.steps=600 --config.probe.enabled=False
"--config.objectives.nat.crop_scale=(1.0, 1.0)" --config.objectives.nat.flip_prob=0.0`;
second: `--config.data.train_split=train[:256] --config.probe.enabled=False`.) Without the
projection the loss stays above the ~0.59 floor even on 64 images seen 300 times; with it
the features reach their targets. In 300 steps on the full set (0.77 epochs) no image
comes round again, so the loss stays near 2 either way (1.99 and 1.98), and the probe
gains come from the first pass.

Measured with the reassignment in the step (2-core CPU shared with other jobs; one run
each, the earlier after-step numbers beside them):

| run | probe top-1 / top-5 | random-init | final loss (cos) | after-step reassignment |
|---|---|---|---|---|
| README comparison budget: ResNet-18 x0.25, CIFAR-10, 300 steps (0.77 epochs) | 27.00 / 77.75 | 32.75 / 82.95 | 1.59 (0.21) | 24.50 / 75.50, loss 2.00 |
| quickstart: tiny CNN, synthetic shapes, 300 steps (1.9 epochs) | 28.00 | 28.10 | 1.91 (0.04) | 24.55 |

(`python -m evals.compare --dataset folder:/work/data/cifar10 --encoder resnet18
--width_multiplier 0.25 --steps 300 --objectives nat --workdir W`, train 164 s; `python
-m selfsup.train --config experiments/quickstart.py:nat --workdir W`, 114 s wall.) The
in-step deal lifts the probe by 2.5 and 3.5 points, still not above random-init. The
loss falls to about 1.6 (cos 0.2) within the first logged steps and stays there: that
cosine is the optimal deal itself, not learning (random unit vectors dealt optimally to
128 random targets in d = 128 reach cos 0.21, mean of 5 draws with scipy). On the
quickstart the second epoch has no reassignment (every third epoch) and the cosine of
the images, now come round again, to the targets they were dealt in the first epoch is
0.02-0.07: at this budget the encoder barely learns its targets.

Expected on the quickstart (`experiments/quickstart.py:nat`, tiny CNN, synthetic shapes,
measured on a 2-core CPU before the projection was the default, proj_dim=0, reassigning
after the step): NAT needs many passes over the data, since an image's target
only means something once the image has come round again. In the quickstart's 300 steps
(1.9 epochs) the probe stays below the random-init baseline (24.1-27.6% vs 28.1% over
runs that differ in augmentation draws or reassignment period; 22-23% with colour views); at 1500 steps (9.6 epochs) it reaches
29.3% vs 28.1%.

Needs stable dataset indices (`batch["index"]` names the image) and the training set size
(`dataset_size`, filled in by the trainer).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from objectives.base import Objective, ObjectiveOutput, l2_normalize
from selfsup import augment
from selfsup.errors import UserError


def sphere_targets(key, n: int, d: int) -> jax.Array:
  """n points uniform on the unit sphere in R^d: normalised standard Gaussians."""
  x = jax.random.normal(key, (n, d), jnp.float32)
  return l2_normalize(x)


def nat_loss(z: jax.Array, c: jax.Array) -> jax.Array:
  """Mean over the batch of ||z_i - c_i||^2 (equal to 2 - 2 z_i.c_i for unit vectors)."""
  z, c = z.astype(jnp.float32), c.astype(jnp.float32)
  return jnp.mean(jnp.sum(jnp.square(z - c), axis=-1))


def reassign(targets, assignment: np.ndarray, index, features) -> np.ndarray:
  """The batch step of NAT's stochastic reassignment in NumPy/SciPy (the reference of
  `reassign_in_step`, which the training step runs).

  The examples in `index` hold the targets assignment[index]; these targets are dealt
  out again among the same examples so that sum_i z_i . c_{new(i)} is maximal (the
  Hungarian algorithm on cost -z.c). Every other example keeps its target, so the result
  is a permutation whenever `assignment` is.

  Args:
    targets: (N, d) target table, NumPy or a (sharded) jax.Array; only the batch's rows
      are read, so a device-resident table is not copied whole to the host.
    assignment: (N,) int NumPy array, example -> target row. Not modified.
    index: (B,) dataset indices of the batch; duplicates (a batch that wraps round an
      epoch boundary) count once, with the features of their first occurrence.
    features: (B, d) the batch's L2-normalised features, rows aligned with `index`.

  Returns:
    The new (N,) assignment, same dtype as `assignment`.
  """
  index = np.asarray(index).astype(np.int64)
  features = np.asarray(features, np.float64)
  # Each example may take part only once, or one example would get two targets.
  unique, first = np.unique(index, return_index=True)
  z = features[first]
  held = np.asarray(assignment)[unique]
  c = np.asarray(targets[held], np.float64)
  rows, cols = scipy.optimize.linear_sum_assignment(-(z @ c.T))
  new = np.array(assignment, copy=True)
  new[unique[rows]] = held[cols]
  return new


def first_occurrences(index: jax.Array) -> jax.Array:
  """(B,) bool: True where index[i] does not occur earlier in the batch."""
  earlier = jnp.tril(index[:, None] == index[None, :], k=-1)
  return ~jnp.any(earlier, axis=1)


def reassign_in_step(targets: jax.Array, assignment: jax.Array, index: jax.Array,
                     features: jax.Array) -> jax.Array:
  """`reassign` as a jittable function: the new (N,) assignment, in the step.

  The same problem as the NumPy reference: the batch's examples (first occurrence of each
  index) deal out the targets they hold so that sum_i z_i . c_{new(i)} is maximal, solved
  with `optax.assignment.hungarian_algorithm` on cost -z.c. Static shapes: the B x B
  problem keeps the duplicate rows and columns (later occurrences of an index) but pairs
  them only among themselves (cost 0 between them, a cost `big` > B between them and the
  first occurrences, which any optimal solution avoids: leaving the duplicate block costs
  at least 2 * big, more than the whole first-occurrence block can gain, at most 2 * B).
  So the first occurrences get the optimal deal of their own held targets, and only their
  rows are written back (the others' scatter index is out of range and dropped), which
  keeps the assignment a permutation.

  features: (B, d) L2-normalised, rows aligned with `index` (the caller stops gradients).
  """
  b, n = index.shape[0], assignment.shape[0]
  first = first_occurrences(index)
  held = assignment[index]                                   # (B,) target rows
  c = targets[held].astype(jnp.float32)
  # Full float32 products: the default precision on accelerators may round to bfloat16.
  score = jnp.matmul(features.astype(jnp.float32), c.T, precision=jax.lax.Precision.HIGHEST)
  big = 2.0 * b + 2.0
  both = first[:, None] & first[None, :]
  neither = ~first[:, None] & ~first[None, :]
  cost = jnp.where(both, -score, jnp.where(neither, 0.0, big))
  rows, cols = optax.assignment.hungarian_algorithm(cost)   # row rows[k] gets column cols[k]
  new_held = jnp.zeros_like(held).at[rows].set(held[cols])
  return assignment.at[jnp.where(first, index, n)].set(new_held, mode="drop")


class NoiseAsTargets(Objective):
  """Align L2-normalised features to fixed random targets, one per training image."""
  image_size: int = 32
  dataset_size: int = 0            # filled in by the trainer: the training set size
  batch_size: int = 0              # filled in by the trainer: the global batch (0: as seen)
  # > 0: a linear layer to this size before the L2 normalisation (the paper's final linear
  # layer, see "Projection"); 0: the pooled, non-negative features themselves.
  proj_dim: int = 128
  target_dim: int = 0              # d; 0: the size of the (projected) features
  reassign_every_epochs: int = 3   # paper: every 3 epochs
  reassign_every_steps: int = 0    # > 0 overrides the epochs: every this many steps
  crop_scale: tuple = (0.5, 1.0)
  flip_prob: float = 0.5
  # Colour off by default: it stands in for the paper's Sobel input layer, which sees
  # only grayscale gradients. With colour, colour alone tells the images (and so their
  # targets) apart: quickstart probe 22-23% with colour views, 24-27.6% grayscale.
  grayscale_prob: float = 1.0
  jitter_strength: float = 0.0
  jitter_prob: float = 0.0
  dtype: Any = jnp.float32

  needs_stable_indices = True

  def validate(self, *, image_size, dataset, batch_size=0):
    del image_size, batch_size
    if len(dataset) < 1:
      raise UserError("objective nat needs a non-empty training set (one target per image)")
    for name in ("proj_dim", "target_dim", "reassign_every_steps"):
      if getattr(self, name) < 0:
        raise UserError(f"objective nat: {name}={getattr(self, name)} must be >= 0")
    if self.reassign_every_epochs < 1:
      raise UserError(f"objective nat: reassign_every_epochs={self.reassign_every_epochs} "
                      "must be >= 1 (use reassign_every_steps for a finer period)")

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    if self.dataset_size < 1:
      raise UserError("objective nat needs dataset_size >= 1 (the trainer sets it to the "
                      "training set size; pass dataset_size= to build_model)")
    # View: light crop + flip, grayscale by default (see the field). NAT is an
    # instance-level task, so some invariance helps, but the paper relies on the target
    # assignment, not on strong augmentation.
    if train:
      cfg = augment.default_view_config(
          crop_scale=tuple(self.crop_scale), flip_prob=self.flip_prob,
          jitter_strength=self.jitter_strength, jitter_prob=self.jitter_prob,
          grayscale_prob=self.grayscale_prob)
      images, _ = augment.view_augment(self.make_rng("augment"), batch, cfg,
                                       self.image_size)
    else:
      images = augment.eval_view(batch, self.image_size)
    out = encoder(images, train=train)

    # Head: optional projection, then onto the unit sphere.
    z = out.pooled
    if self.proj_dim:
      z = nn.Dense(self.proj_dim, dtype=self.dtype, name="proj")(z)
    z = z.astype(jnp.float32)
    z = l2_normalize(z)
    d = z.shape[-1]
    if self.target_dim and self.target_dim != d:
      raise UserError(f"objective nat: target_dim={self.target_dim} differs from the "
                      f"feature size {d}; set proj_dim={self.target_dim} to project the "
                      "features to it, or target_dim=0")

    # State: drawn once at init from the params stream (so it follows config.seed).
    n = self.dataset_size

    def init_targets():
      return sphere_targets(jax.random.fold_in(self.make_rng("params"), 0), n, d)

    def init_assignment():
      key = jax.random.fold_in(self.make_rng("params"), 1)
      return jax.random.permutation(key, n).astype(jnp.int32)

    targets = self.variable("objective_state", "targets", init_targets)
    assignment = self.variable("objective_state", "assignment", init_assignment)

    # Reassignment (Algorithm 1 of the paper): on reassignment steps the batch's held
    # targets are dealt out again to the batch's features, before the loss, so this
    # step's gradient already pulls towards the new targets. Not at init (the state is
    # drawn there, and the dummy batch must not change it) nor in evaluation.
    index = batch["index"]
    z_fixed = jax.lax.stop_gradient(z)
    self.sow("intermediates", "features", z_fixed)   # kept only when asked for (tests)
    if train and not self.is_initializing():
      steps_per_epoch = max(1, n // (self.batch_size or index.shape[0]))
      assignment.value = jax.lax.cond(
          self.is_reassignment_step(step, steps_per_epoch),
          lambda a: reassign_in_step(targets.value, a, index, z_fixed),
          lambda a: a, assignment.value)

    # Loss: squared distance to the assigned target (targets are constants).
    c = targets.value[assignment.value[index]]
    loss = nat_loss(z, c)
    return ObjectiveOutput(
        loss=loss,
        metrics={"cos": jnp.mean(jnp.sum(z_fixed * c, axis=-1))},
        probe_features=out.pooled)

  # ---- schedule ----------------------------------------------------------------------
  def is_reassignment_step(self, step, steps_per_epoch: int):
    """Every step of every `reassign_every_epochs`-th epoch (from epoch 0), or of every
    `reassign_every_steps`-th step when that is set. `step` may be a Python int (gives a
    bool) or a traced step counter (gives a boolean array)."""
    if self.reassign_every_steps:
      return step % self.reassign_every_steps == 0
    return (step // max(1, steps_per_epoch)) % self.reassign_every_epochs == 0
