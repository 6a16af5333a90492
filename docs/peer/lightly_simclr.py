"""lightly's SimCLR (PyTorch) on CIFAR-10 with one recipe; saves features for our probe.

Runs in a separate virtualenv with torch, torchvision and lightly (never a dependency of
this project); `docs/peer/compare_lightly.py` drives it and probes what it saves with our
L-BFGS probe (README, "SimCLR against lightly"):

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 lightly
    /work/peer-venv/bin/python docs/peer/lightly_simclr.py --data /data/cifar10 \
        --probe_inputs inputs.npz --out lightly_features.npz

The recipe (lightly's SimCLR example and CIFAR-10 benchmark, at the issue's settings):
torchvision's ResNet-18 with the CIFAR stem (conv1 3x3 stride 1, no max-pool, fc
removed; torchvision's initialisation), lightly's SimCLRProjectionHead(512, 512, 128),
NTXentLoss(temperature=0.5), SimCLRTransform(input_size=32, cj_strength=0.5,
gaussian_blur=0.0) (random resized crop 0.08-1, flip 0.5, colour jitter 0.4/0.4/0.4/0.1
with p 0.8 in random order, grayscale 0.2, ImageNet normalisation), batch 128 drawn
shuffled from the train folder, 100 steps of SGD lr 0.12, momentum 0.9, weight decay
5e-4 on every parameter (torch's SGD), cosine decay to 0 stepped every step.

`--probe_inputs` is an .npz of the exact probe inputs our probe feeds its encoder
(train_x / test_x float32 (N, 32, 32, 3), already resized, centre-cropped and
normalised with the ImageNet statistics, plus labels), so both frameworks are probed on
the same tensors. The features of the randomly initialised backbone (before the first
step) and of the trained one (eval mode: BatchNorm running statistics) are written to
`--out` with the per-step losses.

Switches for locating a difference (`--no_decay_bn_bias`: no weight decay on BatchNorm
parameters and biases, as ours; `--zero_init_residual`: the last BatchNorm scale of each
block starts at 0, as ours).
"""

import argparse
import json
import time

import numpy as np
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform


def backbone(zero_init_residual: bool, width: float = 1.0) -> torch.nn.Module:
  """torchvision's ResNet-18 with the CIFAR stem; `width` scales every stage's channels
  (64 x width in the stem and first stage, as our `width_multiplier`), initialised as
  torchvision initialises its ResNets."""
  from torchvision.models.resnet import BasicBlock
  net = torchvision.models.resnet18(zero_init_residual=zero_init_residual)
  c = max(8, int(64 * width))
  net.conv1 = torch.nn.Conv2d(3, c, kernel_size=3, stride=1, padding=1, bias=False)
  net.maxpool = torch.nn.Identity()
  net.fc = torch.nn.Identity()
  if width != 1.0:
    net.bn1 = torch.nn.BatchNorm2d(c)
    net.inplanes = c
    net.layer1 = net._make_layer(BasicBlock, c, 2)
    net.layer2 = net._make_layer(BasicBlock, 2 * c, 2, stride=2)
    net.layer3 = net._make_layer(BasicBlock, 4 * c, 2, stride=2)
    net.layer4 = net._make_layer(BasicBlock, 8 * c, 2, stride=2)
  for m in net.modules():  # torchvision's ResNet initialisation
    if isinstance(m, torch.nn.Conv2d):
      torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, torch.nn.BatchNorm2d):
      torch.nn.init.constant_(m.weight, 1)
      torch.nn.init.constant_(m.bias, 0)
  if zero_init_residual:
    for m in net.modules():
      if isinstance(m, BasicBlock):
        torch.nn.init.constant_(m.bn2.weight, 0)
  net.out_dim = 8 * c
  return net


class SimCLR(torch.nn.Module):
  def __init__(self, zero_init_residual: bool, width: float = 1.0):
    super().__init__()
    self.backbone = backbone(zero_init_residual, width)
    self.projection_head = SimCLRProjectionHead(self.backbone.out_dim, 512, 128)

  def forward(self, x):
    return self.projection_head(self.backbone(x).flatten(start_dim=1))


@torch.no_grad()
def features(net: torch.nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
  net.eval()
  out = []
  for i in range(0, len(x), batch):
    t = torch.from_numpy(np.ascontiguousarray(x[i:i + batch].transpose(0, 3, 1, 2)))
    out.append(net(t).flatten(start_dim=1).numpy())
  return np.concatenate(out).astype(np.float32)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="folder with train/CLASS/*.jpg")
  p.add_argument("--probe_inputs", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.12)
  p.add_argument("--weight_decay", type=float, default=5e-4)
  p.add_argument("--temperature", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier")
  p.add_argument("--no_decay_bn_bias", action="store_true")
  p.add_argument("--zero_init_residual", action="store_true")
  args = p.parse_args()

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)
  probe = np.load(args.probe_inputs)

  model = SimCLR(args.zero_init_residual, args.width)
  t0 = time.perf_counter()
  random_train = features(model.backbone, probe["train_x"])
  random_test = features(model.backbone, probe["test_x"])
  extract_s = time.perf_counter() - t0

  transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
  dataset = torchvision.datasets.ImageFolder(f"{args.data}/train", transform=transform)
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0,
      generator=torch.Generator().manual_seed(args.seed))
  criterion = NTXentLoss(temperature=args.temperature)
  if args.no_decay_bn_bias:
    decay = [q for n, q in model.named_parameters() if q.ndim > 1]
    no_decay = [q for n, q in model.named_parameters() if q.ndim <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
  else:
    groups = model.parameters()
  optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9,
                              weight_decay=args.weight_decay)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)

  losses = []
  step = 0
  t0 = time.perf_counter()
  model.train()
  while step < args.steps:
    for (x0, x1), _ in loader:
      loss = criterion(model(x0), model(x1))
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      schedule.step()
      losses.append(loss.item())
      step += 1
      if step % 10 == 0 or step == 1:
        print(json.dumps({"step": step, "loss": round(losses[-1], 4),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
      if step == args.steps:
        break
  train_s = time.perf_counter() - t0

  trained_train = features(model.backbone, probe["train_x"])
  trained_test = features(model.backbone, probe["test_x"])
  np.savez(args.out, random_train_x=random_train, random_test_x=random_test,
           train_x=trained_train, test_x=trained_test, losses=np.asarray(losses),
           train_seconds=train_s, extract_seconds=extract_s)
  print(json.dumps({"final_loss": losses[-1], "train_seconds": round(train_s, 1)}))


if __name__ == "__main__":
  main()
