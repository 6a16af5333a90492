"""Noise As Targets (Bojanowski & Joulin 2017) on ImageNet, ResNet-50.

    python -m selfsup.train --config experiments/nat_imagenet.py --workdir gs://BUCKET/nat_in
    python -m evals.linear_probe --checkpoint gs://BUCKET/nat_in --dataset tfds:imagenet2012 \
        --test_split validation

Needs a prepared `imagenet2012` (array_record format: `tfds build imagenet2012
--file_format=array_record` with the manual download). Recipe (the paper's): one fixed
target per training image on the unit sphere, d = 2048 after a linear projection of the
pooled ResNet-50 features (the paper's final linear layer, see objectives/nat.py
"Projection"; the paper used AlexNet's 4096), square loss to the assigned target,
Hungarian reassignment within each batch on every third epoch, plain SGD (no momentum)
lr 0.01 constant, batch 256. Views: light crop + flip, in grayscale (stands in for the
paper's Sobel input layer, which removes colour; a Sobel layer itself would change the
encoder's input for every evaluation). Our choices, not the paper's: ResNet-50,
100 epochs, weight decay 5e-4, bfloat16 compute.
Memory: the target table is 1,281,167 x 2048 float32 = 10.5 GB, part of the checkpointed
state. The trainer shards it over the data axis (1.3 GB per device on 8); on one device
it must fit next to the model. The reassignment (in the step) reads only the batch's
rows of it.
Expected: no anchor in OBJECTIVES.md, and none is published for this setting (the paper
reports AlexNet on ImageNet and PASCAL VOC, not ResNet-50).
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config()
  c.objectives = {"nat": objective("nat", 1.0, proj_dim=2048, reassign_every_epochs=3,
                                   crop_scale=(0.5, 1.0), flip_prob=0.5)}
  set_epochs(c, epochs=100, batch=256, dataset="imagenet2012")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.01
  c.optimizer.scale_with_batch = False
  c.optimizer.momentum = 0.0
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "constant"
  c.mesh.sharding = "fsdp"
  return c
