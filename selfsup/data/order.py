"""Batch orders other than a uniform shuffle: the cluster-balanced order (G-SimCLR).

An order is a permutation of the dataset's indices for every epoch, a pure function of
(seed, epoch) and the order's own data, so a pipeline built on it saves and restores its
position exactly like the uniform shuffle (the iterator state is only a position) and
any number of processes can slice the same global order. It is usable by any objective:
`config.data.order=cluster_balanced` with `config.data.cluster_file=FILE.npy`.

Cluster-balanced (Chakraborty et al. 2020, "G-SimCLR: Self-Supervised Contrastive
Learning with Guided Projection via Pseudo Labelling", ICDM workshops, arXiv:2009.12007):
each example carries a cluster id (k-means of an autoencoder's latents, K = the batch
size); the order spreads every cluster evenly over the epoch so that each batch of B
consecutive examples holds about B * n_k / N members of cluster k: one per cluster when
K = B and the clusters are equal, i.e. fewer same-cluster (likely same-class) negatives
in SimCLR's batch. Construction (`balanced_permutation`): the members of cluster k, in a
random order, sit at the fractional positions (j + u_k) / n_k, j = 0..n_k-1, with one
random offset u_k in [0, 1) per cluster; sorting all examples by position (random
tie-breaks) gives the epoch's order. With equal clusters of size n and K = B, batch j is
exactly the j-th members of all clusters. The authors' code sorts a dataframe so that
each batch takes one row per cluster and drops what is left; this order keeps every
example in every epoch.
"""

from __future__ import annotations

import grain
import numpy as np

from selfsup.errors import UserError

ORDERS = ("shuffle", "cluster_balanced")
_SALT = 0xC1A5


def balanced_permutation(clusters: np.ndarray, seed: int, epoch: int) -> np.ndarray:
  """The cluster-balanced order of one epoch: a permutation of range(len(clusters)).

  Args:
    clusters: (N,) integer cluster id of every example (any ids; empty clusters are fine).
    seed, epoch: the order is a pure function of them (and of `clusters`).

  Returns:
    (N,) int64 dataset indices in the order they are read.
  """
  clusters = np.asarray(clusters)
  rng = np.random.default_rng([int(seed) % 2**63, int(epoch), _SALT])
  ids, inverse = np.unique(clusters, return_inverse=True)
  by_cluster = np.argsort(inverse, kind="stable")          # members of each id, in index order
  counts = np.bincount(inverse, minlength=len(ids))
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  members = np.empty_like(by_cluster)
  position = np.empty(len(clusters), np.float64)
  offsets = rng.random(len(ids))
  for k in range(len(ids)):
    lo, hi = starts[k], starts[k] + counts[k]
    members[lo:hi] = by_cluster[lo:hi][rng.permutation(counts[k])]
    position[lo:hi] = (np.arange(counts[k]) + offsets[k]) / counts[k]
  tie = rng.random(len(clusters))
  return members[np.lexsort((tie, position))].astype(np.int64)


def load_clusters(path: str, dataset_size: int) -> np.ndarray:
  """Reads a cluster file (.npy, one integer id per training example); UserError if it
  does not match the dataset."""
  try:
    clusters = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f"config.data.cluster_file={path!r} cannot be read as a .npy array of "
                    f"cluster ids ({type(e).__name__}: {e})") from None
  if clusters.ndim != 1 or not np.issubdtype(clusters.dtype, np.integer):
    raise UserError(f"config.data.cluster_file={path!r} holds a {clusters.dtype} array of "
                    f"shape {clusters.shape}; it must be 1-D integer cluster ids, one per "
                    "training example")
  if len(clusters) != dataset_size:
    raise UserError(f"config.data.cluster_file={path!r} has {len(clusters)} cluster ids but "
                    f"the training set has {dataset_size} examples; it must have one per "
                    "example (make it on this dataset and split)")
  return clusters


class ClusterBalancedMapDataset(grain.MapDataset):
  """`parent` read in `balanced_permutation` order, a new one every epoch.

  A drop-in for `MapDataset.shuffle`: index i of a repeated dataset is position
  i mod N of epoch i // N, as grain's shuffle does, so slicing per process and repeating
  compose the same way and the iterator's state stays a position.
  """

  def __init__(self, parent: grain.MapDataset, clusters: np.ndarray, seed: int):
    super().__init__(parent)
    self._clusters = np.asarray(clusters)
    if len(self._clusters) != len(parent):
      raise UserError(f"{len(self._clusters)} cluster ids for {len(parent)} examples")
    self._seed = int(seed)
    self._cache = {}                    # epoch -> permutation, the two newest epochs

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return "ClusterBalancedMapDataset"

  def _permutation(self, epoch: int) -> np.ndarray:
    # Reader threads straddle an epoch boundary for a few examples: keep two epochs.
    perm = self._cache.get(epoch)
    if perm is None:
      perm = balanced_permutation(self._clusters, self._seed, epoch)
      newest = {e: p for e, p in self._cache.items() if e >= epoch - 1}
      newest[epoch] = perm
      self._cache = newest
    return perm

  def _ordered_index(self, index: int) -> int:
    n = len(self._parent)
    epoch, pos = divmod(int(index), n)
    return int(self._permutation(epoch)[pos]) + epoch * n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._ordered_index(index)]

  def _getitems(self, indices):
    return self._parent._getitems([self._ordered_index(i) for i in indices])  # pylint: disable=protected-access


def check_order(order: str) -> None:
  if order not in ORDERS:
    raise UserError(f"config.data.order must be one of {', '.join(ORDERS)}, not {order!r}")
