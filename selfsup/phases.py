"""Runs before the run: the clustering phase that makes `config.data.cluster_file`.

G-SimCLR (Chakraborty et al. 2020, arXiv:2009.12007) is SimCLR on a batch order in which
every batch spreads over clusters of the data. With `config.clusters.enabled`, `prepare`
makes those clusters before the main run, in the run's own directory:

  1. WORKDIR/clusters/autoencoder: train `config.clusters.objective` (the denoising
     `autoencoder`) with `config.clusters.encoder` for `config.clusters.steps` (an
     ordinary run: checkpoints, metrics, resume);
  2. its pooled features of every training image (evaluation view), k-means with
     K = `config.clusters.k` or the global batch (scikit-learn's `KMeans`, k-means++ seeds,
     seeded by config.seed) -> WORKDIR/clusters/clusters.npy, written atomically;
  3. the returned config reads that file with `data.order=cluster_balanced`.

One command runs both phases; rerunning it resumes whichever was interrupted (phase 1
from its newest checkpoint; the k-means is redone only if its file is missing; the main
run from its own checkpoints). A SIGTERM in phase 1 saves it and stops the command.
"""

import os

import ml_collections
import numpy as np

from selfsup.errors import UserError

CLUSTER_DIR = "clusters"
CLUSTER_FILE = "clusters.npy"


def cluster_file(workdir: str) -> str:
  return os.path.join(workdir, CLUSTER_DIR, CLUSTER_FILE)


def phase_config(config) -> ml_collections.ConfigDict:
  """The first phase's training config: the run's data and seed, the phase's objective,
  encoder, budget and optimizer (AdamW, warmup, cosine), no probe, no clusters."""
  from selfsup.config import objective
  cl = config.clusters
  c = ml_collections.ConfigDict(config.to_dict())
  c.objectives = {cl.objective: objective(cl.objective, 1.0)}
  c.encoder = {"name": cl.encoder}
  c.train.steps = cl.steps
  c.train.batch_size = cl.batch_size
  c.train.online_probe = False
  c.train.checkpoint_every = min(c.train.checkpoint_every, cl.steps)
  c.train.log_every = max(1, min(c.train.log_every, cl.steps // 10))
  c.data.order = "shuffle"
  c.data.cluster_file = ""
  c.clusters.enabled = False
  c.optimizer.name = "adamw"
  c.optimizer.lr = cl.lr
  c.optimizer.scale_with_batch = False
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = min(20, cl.steps // 10)
  c.optimizer.weight_decay = 1e-4
  c.probe.enabled = False
  return c


def kmeans_labels(features: np.ndarray, k: int, seed: int, max_examples: int = 0) -> np.ndarray:
  """Cluster id of every row: scikit-learn KMeans (k-means++, one init, seeded); fitted
  on a seeded subset of `max_examples` rows when that is set, then every row assigned."""
  from sklearn.cluster import KMeans
  features = np.asarray(features, np.float32)
  n = len(features)
  if k > n:
    raise UserError(f"config.clusters.k={k} is more than the {n} training examples")
  fit = features
  if max_examples and max_examples < n:
    rows = np.random.default_rng(seed).choice(n, size=max(k, max_examples), replace=False)
    fit = features[np.sort(rows)]
  km = KMeans(n_clusters=k, n_init=1, random_state=seed % 2**32).fit(fit)
  return km.predict(features).astype(np.int32)


def _write_atomic(path: str, array: np.ndarray) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, array)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check(config) -> None:
  """Start-up check of a given cluster file against the training set (UserError), so a
  file that does not match fails before anything is written."""
  if config.data.order != "cluster_balanced" or config.clusters.enabled:
    return
  from selfsup import data as data_lib
  source = data_lib.make_source(config.data.source, config.data.train_split,
                                image_size=config.data.image_size,
                                data_dir=config.data.data_dir or None)
  data_lib.load_clusters(config.data.cluster_file, len(source))


def prepare(config, workdir: str, *, log=print):
  """Runs the clustering phase when the config asks for it.

  Returns (config for the main run, True), or (None, False) when phase 1 was stopped by
  SIGTERM (saved; rerun the command). Without `config.clusters.enabled` it returns the
  config unchanged.
  """
  if not config.clusters.enabled:
    return config, True
  import jax

  from evals.features import encoder_variables
  from evals.stream import image_features, stream_features
  from selfsup.trainer import Trainer

  path = cluster_file(workdir)
  if not os.path.exists(path):
    phase = Trainer(phase_config(config), os.path.join(workdir, CLUSTER_DIR, "autoencoder"))
    phase.run()
    if phase.preempted:
      return None, False
    log(f"clusters: k-means of the {config.clusters.objective} features "
        f"(K={config.clusters.k or config.train.batch_size}) -> {path}")
    encoder = phase.model.encoder
    state = jax.device_get(phase.state)
    features, _ = stream_features(
        image_features(encoder), encoder_variables(state), phase.source,
        image_size=config.data.image_size, crop_fraction=config.data.eval_crop_fraction,
        nonfinite_message="the clustering phase's features are not finite")
    if len(features) != len(phase.source):
      raise UserError(f"clusters: {len(features)} features for {len(phase.source)} training "
                      "examples (unreadable images were skipped); use a clean dataset")
    labels = kmeans_labels(features, config.clusters.k or config.train.batch_size,
                           config.seed, config.clusters.max_examples)
    if jax.process_index() == 0:
      _write_atomic(path, labels)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("selfsup.phases.clusters")
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.order = "cluster_balanced"
  c.data.cluster_file = path
  return c, True
