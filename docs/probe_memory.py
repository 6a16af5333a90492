"""Peak host memory of probe feature extraction: streamed vs whole split in memory.

    python docs/probe_memory.py --folder /tmp/mem20k --image_size 224 --mode stream
    python docs/probe_memory.py --folder /tmp/mem20k --image_size 224 --mode arrays

Extracts random-init tiny-CNN features of FOLDER/train at IMAGE_SIZE px, either streamed
(`evals.stream.stream_features`, what the probe does) or the old way
(`load_arrays` + `extract_features`), and prints one JSON line with the process's peak
resident memory (`ru_maxrss`) and the memory after importing JAX and building the
encoder, so the difference is what extraction itself costs. Run each mode in its own
process: ru_maxrss is a per-process peak.
"""

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--folder", required=True)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--mode", choices=("stream", "arrays"), required=True)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--num_workers", type=int, default=0)
  args = parser.parse_args()

  import jax
  from ml_collections import ConfigDict

  import encoders
  from evals import features as features_lib
  from evals import stream
  from selfsup import data

  encoder = encoders.build_encoder(ConfigDict({"name": "tiny_cnn"}), "float32")
  variables = jax.jit(lambda: features_lib.random_init_variables(encoder, 32))()
  source = data.FolderSource(args.folder, "train")
  before = _rss_mb()
  t0 = time.perf_counter()
  if args.mode == "stream":
    x, _ = stream.stream_features(stream.image_features(encoder), variables, source,
                                  image_size=args.image_size, batch_size=args.batch_size,
                                  num_workers=args.num_workers)
  else:
    images, _ = data.load_arrays(source, args.image_size)
    x = features_lib.extract_features(encoder, variables, images, args.batch_size)
  print(json.dumps({"mode": args.mode, "examples": int(x.shape[0]), "feature_dim": int(x.shape[1]),
                    "image_size": args.image_size, "batch_size": args.batch_size,
                    "rss_before_mb": round(before), "peak_rss_mb": round(_rss_mb()),
                    "uint8_images_mb": round(x.shape[0] * args.image_size ** 2 * 3 / 2**20),
                    "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
  sys.exit(main())
