"""The configuration schema: defaults for every field, and start-up validation.

Experiment files in `experiments/` start from `default_config()` and override fields.
`validate()` fails at start-up with one line naming an unknown key or a bad value and
the valid choices; the `encoder` and `objectives` sections are checked by their
registries (each objective's options are its dataclass fields).
"""

import ml_collections

from selfsup.errors import UserError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic:shapes"   # synthetic:NAME | folder:PATH | tfds:NAME[/CONFIG][:VERSION]
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.image_size = 32
  # Training canvas: the host fits the whole image into source_size x source_size (padded)
  # and the device crops views from it (docs/design.md, "Views from the whole image").
  # 0 = image_size: right for 32 px data; photographs want more (imagenet_config).
  c.data.source_size = 0
  c.data.eval_crop_fraction = 1.0      # evaluation centre crop (0.875 ImageNet-style)
  c.data.num_workers = 0               # grain worker processes (0 = in the main process)
  c.data.prefetch = 2
  c.data.strict = False                # True: a corrupt image is an error, not a skip
  c.data.data_dir = ""                 # TFDS data_dir ("" = TFDS default)
  # Batch order: shuffle (uniform) | cluster_balanced (each batch spreads over the clusters
  # of data.cluster_file, a .npy of one id per training example; selfsup/data/order.py).
  c.data.order = "shuffle"
  c.data.cluster_file = ""

  c.encoder = ml_collections.ConfigDict({"name": "tiny_cnn"})
  # name -> {"weight": w, option: value, ...}; several entries = a weighted combination.
  c.objectives = ml_collections.ConfigDict({"rotation": {"weight": 1.0}})

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 128             # global batch, over all devices and hosts
  c.train.dtype = "float32"            # compute dtype: float32 | bfloat16 (params stay f32)
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3         # the newest N checkpoints are kept (>= 1)
  c.train.on_nonfinite = "stop"        # non-finite loss/gradients: stop | skip (the update)
  c.train.online_probe = True          # linear head on stop-gradient features, if labels
  c.train.progress_bar = True
  # Memory: activation rematerialisation in the encoder (none | blocks | full) and the
  # global batch as `accumulate` micro-batches (BatchNorm statistics and contrastive
  # negatives per micro-batch; README "Scale out").
  c.train.remat = "none"
  c.train.accumulate = 1
  # Compile time on GPU/TPU (not measured): run each ResNet stage's identical blocks, and
  # ViT's blocks, as one lax.scan (one compiled block body; the same parameters and
  # checkpoints either way). Off: on CPU it compiles slower and steps much slower
  # (docs/design.md "Memory and compilation").
  c.train.scan_blocks = False
  # Persistent XLA compilation cache: "user" (~/.cache/selfsup/jax, or
  # $XDG_CACHE_HOME/selfsup/jax), "workdir" (DIR/jax_cache), a folder, or "off".
  # JAX_COMPILATION_CACHE_DIR, when set, wins over "user".
  c.train.compile_cache = "user"
  c.train.image_every = 500            # objectives with pictures (SparK, MAE): a PNG grid
                                       # in WORKDIR/images/ and TensorBoard (0 = never)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"             # sgd | lars | adamw | lamb
  c.optimizer.lr = 0.1                 # peak lr (x batch/256 if scale_with_batch)
  c.optimizer.scale_with_batch = True
  c.optimizer.schedule = "cosine"      # cosine | constant | step
  c.optimizer.warmup_steps = 0
  c.optimizer.step_fractions = (0.3, 0.6, 0.8)
  c.optimizer.step_factor = 0.2
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.grad_clip = 0.0          # global-norm clip (0 = off)
  c.optimizer.probe_lr = 0.1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                     # -1: all devices not used by `model`
  c.mesh.model = 1                     # tensor-parallel ways (ViT)
  c.mesh.sharding = "replicate"        # replicate | fsdp
  c.mesh.fsdp_min_size = 2**18

  # A first phase that makes data.cluster_file (G-SimCLR): train `clusters.objective` with
  # `clusters.encoder` for `clusters.steps`, k-means its pooled features of the training set
  # into `clusters.k` clusters (0 = train.batch_size), then train this config on the
  # cluster-balanced order. Files under WORKDIR/clusters/; a rerun resumes either phase.
  c.clusters = ml_collections.ConfigDict()
  c.clusters.enabled = False
  c.clusters.objective = "autoencoder"
  c.clusters.encoder = "tiny_cnn"
  c.clusters.steps = 300
  c.clusters.batch_size = 128
  c.clusters.lr = 2e-3                 # AdamW
  c.clusters.k = 0
  c.clusters.max_examples = 0          # k-means on a seeded subset of this many (0 = all)

  c.probe = ml_collections.ConfigDict()  # the end-of-run linear probe (quickstart)
  c.probe.enabled = False
  c.probe.train_examples = 5000
  c.probe.test_examples = 2000
  return c


_FREE_FORM = ("encoder", "objectives")
NONFINITE_CHOICES = ("stop", "skip")
REMAT_CHOICES = ("none", "blocks", "full")


def validate(config) -> None:
  """Raises UserError for unknown keys or out-of-range values."""
  _check_keys(config, default_config(), "config")
  if config.train.steps < 1:
    raise UserError(f"config.train.steps must be >= 1, got {config.train.steps}")
  if config.train.batch_size < 1:
    raise UserError(f"config.train.batch_size must be >= 1, got {config.train.batch_size}")
  for key, meaning in (("log_every", "log every N steps"),
                       ("checkpoint_every", "save every N steps"),
                       ("keep_checkpoints", "keep the newest N checkpoints; 0 would delete "
                                            "every checkpoint")):
    value = config.train[key]
    if not isinstance(value, int) or value < 1:
      raise UserError(f"config.train.{key} must be an integer >= 1 ({meaning}), got {value!r}")
  if not isinstance(config.train.image_every, int) or config.train.image_every < 0:
    raise UserError(f"config.train.image_every must be an integer >= 0 (0 = no pictures), "
                    f"got {config.train.image_every!r}")
  if config.train.on_nonfinite not in NONFINITE_CHOICES:
    raise UserError(f"config.train.on_nonfinite must be one of {', '.join(NONFINITE_CHOICES)}, "
                    f"not {config.train.on_nonfinite!r}")
  if config.train.remat not in REMAT_CHOICES:
    raise UserError(f"config.train.remat must be one of {', '.join(REMAT_CHOICES)} (activation "
                    f"rematerialisation), not {config.train.remat!r}")
  if not isinstance(config.train.get("scan_blocks", False), bool):
    raise UserError(f"config.train.scan_blocks must be true or false, got "
                    f"{config.train.scan_blocks!r}")
  k = config.train.accumulate
  if not isinstance(k, int) or k < 1 or config.train.batch_size % k:
    raise UserError(f"config.train.accumulate must be an integer >= 1 that divides "
                    f"train.batch_size={config.train.batch_size} (micro-batches), got {k!r}")
  if not isinstance(config.train.compile_cache, str) or not config.train.compile_cache:
    raise UserError("config.train.compile_cache must be user, workdir, off or a folder, got "
                    f"{config.train.compile_cache!r}")
  if config.data.image_size < 8:
    raise UserError(f"config.data.image_size must be >= 8, got {config.data.image_size}")
  if config.data.source_size and config.data.source_size < config.data.image_size:
    raise UserError(f"config.data.source_size={config.data.source_size} is below "
                    f"image_size={config.data.image_size}; use 0 (= image_size) or a larger "
                    "canvas")
  if config.data.source_size < 0:
    raise UserError(f"config.data.source_size must be >= 0, got {config.data.source_size}")
  if not 0 < config.data.eval_crop_fraction <= 1:
    raise UserError(f"config.data.eval_crop_fraction must be in (0, 1] (0.875 for ImageNet-"
                    f"style data, 1.0 for 32 px data), got {config.data.eval_crop_fraction}")
  if config.data.order not in ("shuffle", "cluster_balanced"):
    raise UserError(f"config.data.order must be one of shuffle, cluster_balanced, not "
                    f"{config.data.order!r}")
  if config.data.order == "cluster_balanced" and not (config.data.cluster_file
                                                      or config.clusters.enabled):
    raise UserError("config.data.order=cluster_balanced needs config.data.cluster_file (a "
                    ".npy of one cluster id per training example) or config.clusters.enabled"
                    "=True to make one")
  if config.clusters.enabled:
    if config.clusters.k < 0:
      raise UserError(f"config.clusters.k must be >= 1 (or 0 = train.batch_size), got "
                      f"{config.clusters.k}")
    if config.clusters.steps < 1 or config.clusters.batch_size < 1:
      raise UserError(f"config.clusters.steps and config.clusters.batch_size must be >= 1, "
                      f"got {config.clusters.steps} and {config.clusters.batch_size}")
    if config.clusters.max_examples < 0:
      raise UserError(f"config.clusters.max_examples must be >= 0 (0 = all), got "
                      f"{config.clusters.max_examples}")
  if config.train.dtype not in ("float32", "bfloat16"):
    raise UserError(f"config.train.dtype must be float32 or bfloat16, not {config.train.dtype!r}")
  if not config.objectives:
    raise UserError("config.objectives is empty; name at least one objective")
  total = 0.0
  for name, options in config.objectives.items():
    weight = dict(options).get("weight", 1.0)
    if weight < 0:
      raise UserError(f"config.objectives.{name}.weight must be >= 0, got {weight}")
    total += weight
  if total <= 0:
    raise UserError("the objective weights sum to zero; give at least one a positive weight")


def check_probe_splits(config) -> None:
  """With the end-of-run probe on, its splits must exist before training, not after it."""
  if not config.probe.enabled:
    return
  from selfsup import data as data_lib
  for key in ("train_split", "test_split"):
    split = config.data[key]
    try:
      data_lib.make_source(config.data.source, split, image_size=config.data.image_size,
                           data_dir=config.data.data_dir or None)
    except UserError as e:
      raise UserError(f"config.data.{key}={split!r} (read by the end-of-run probe, "
                      f"config.probe.enabled=True): {e}") from e


def _check_keys(config, reference, prefix):
  for key in config.keys():
    if key not in reference:
      raise UserError(f"unknown config key {prefix}.{key}; valid keys: "
                      f"{', '.join(sorted(reference.keys()))}")
    sub, ref = config[key], reference[key]
    if key in _FREE_FORM and prefix == "config":
      continue
    if isinstance(ref, ml_collections.ConfigDict) and isinstance(sub, ml_collections.ConfigDict):
      _check_keys(sub, ref, f"{prefix}.{key}")


def canvas_size(config) -> int:
  """Side of the training canvas: config.data.source_size, or image_size when it is 0."""
  return int(config.data.source_size or config.data.image_size)


def objective(name: str, weight: float = 1.0, **options) -> dict:
  """A `config.objectives` entry with every option of the objective at its default.

  Listing all options in the config (not only the changed ones) lets the command line
  override any of them (`--config.objectives.simclr.temperature=0.2`) and shows users
  what can be set.
  """
  import dataclasses

  import objectives as objectives_lib
  valid = objectives_lib.check_options(name, options)
  fields = {f.name: f.default for f in dataclasses.fields(objectives_lib.objective_class(name))
            if f.name in valid}
  return {"weight": weight, **fields, **options}


DATASET_SIZES = {"cifar10": 50000, "imagenet2012": 1281167}


def cifar10_config() -> ml_collections.ConfigDict:
  """Defaults shared by the CIFAR-10 recipes: 32x32, ResNet-18 with the CIFAR stem."""
  c = default_config()
  c.data.source = "tfds:cifar10"
  c.data.image_size = 32
  c.data.num_workers = 4
  c.encoder = {"name": "resnet18", "cifar_stem": True}
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  return c


def imagenet_config(image_size: int = 224) -> ml_collections.ConfigDict:
  """Defaults shared by the ImageNet recipes: ResNet-50, bfloat16 compute."""
  c = default_config()
  c.data.source = "tfds:imagenet2012"
  c.data.test_split = "validation"
  c.data.image_size = image_size
  # 288 for 224: the whole photo at 288 on its longer side (ImageNet's median 500x375
  # becomes 288x216), so a 0.08-area crop is ~71 px instead of the ~63 px of a 224 centre
  # crop, at 1.65x the host bytes of a 224 image (docs/design.md).
  c.data.source_size = image_size * 9 // 7
  c.data.eval_crop_fraction = 0.875
  c.data.num_workers = 16
  c.encoder = {"name": "resnet50"}
  c.train.dtype = "bfloat16"
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  return c


def set_epochs(c, epochs: int, batch: int, dataset: str) -> int:
  """Sets batch size and steps for `epochs` passes over `dataset`; returns steps/epoch."""
  steps_per_epoch = DATASET_SIZES[dataset] // batch
  c.train.batch_size = batch
  c.train.steps = epochs * steps_per_epoch
  return steps_per_epoch
