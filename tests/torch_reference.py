"""Independent PyTorch references, written for the tests from ../shared/SEED.md.

`SeedUNet` uses the seed's module names (`in_conv`, `downK.downsampling`, `upK.upsampling`, ...)
and, like the seed, needs H and W divisible by 2**depth. `MilesialUNet` uses milesial/Pytorch-UNet's
names (`inc`, `downK.maxpool_conv`, `upK.up`, `outc`), pads before the concat so any size works,
and has its bilinear variant. Both take a width and depth so tests can stay small; the defaults
are the published models.
"""

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
  def __init__(self, cin, cout, mid=None, bias=False):
    super().__init__()
    mid = mid or cout
    self.double_conv = nn.Sequential(
        nn.Conv2d(cin, mid, 3, padding=1, bias=bias), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

  def forward(self, x):
    return self.double_conv(x)


class Down(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.downsampling = nn.Sequential(nn.MaxPool2d(2, stride=2), DoubleConv(cin, cout))

  def forward(self, x):
    return self.downsampling(x)


class Up(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.upsampling = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
    self.conv = DoubleConv(cin, cout)

  def forward(self, x1, x2):
    x1 = self.upsampling(x1)
    return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
  def __init__(self, cin, num_classes):
    super().__init__()
    self.conv = nn.Conv2d(cin, num_classes, kernel_size=1)

  def forward(self, x):
    return self.conv(x)


class SeedUNet(nn.Module):
  def __init__(self, in_channels=1, num_classes=1, base=64, depth=4):
    super().__init__()
    self.depth = depth
    self.in_conv = DoubleConv(in_channels, base)
    for k in range(1, depth + 1):
      setattr(self, f'down{k}', Down(base * 2**(k - 1), base * 2**k))
    for k in range(1, depth + 1):
      level = depth - k
      setattr(self, f'up{k}', Up(base * 2**(level + 1), base * 2**level))
    self.out_conv = OutConv(base, num_classes)

  def forward(self, x):
    skips = [self.in_conv(x)]
    for k in range(1, self.depth + 1):
      skips.append(getattr(self, f'down{k}')(skips[-1]))
    x = skips.pop()
    for k in range(1, self.depth + 1):
      x = getattr(self, f'up{k}')(x, skips.pop())
    return self.out_conv(x)


class DeepSupervisedSeedUNet(SeedUNet):
  """SeedUNet with nnU-Net's deep supervision (its UNetDecoder with deep_supervision=True): a
  1x1 head `ds_out{k}` on the output of every Up block but the last (whose head is out_conv);
  in training mode forward returns every head's logits, finest first, the coarsest (ds_out1's)
  included; in eval mode out_conv's alone (nnU-Net switches its deep supervision off to
  predict)."""

  def __init__(self, in_channels=1, num_classes=1, base=64, depth=4):
    super().__init__(in_channels, num_classes, base, depth)
    for k in range(1, depth):
      setattr(self, f'ds_out{k}', OutConv(base * 2**(depth - k), num_classes))

  def forward(self, x):
    if not self.training:
      return super().forward(x)
    skips = [self.in_conv(x)]
    for k in range(1, self.depth + 1):
      skips.append(getattr(self, f'down{k}')(skips[-1]))
    x = skips.pop()
    outputs = []
    for k in range(1, self.depth + 1):
      x = getattr(self, f'up{k}')(x, skips.pop())
      outputs.append(getattr(self, f'ds_out{k}')(x) if k < self.depth else self.out_conv(x))
    return outputs[::-1]


def nnunet_deep_supervision_loss(outputs, target, loss):
  """nnU-Net v2's deep supervision loss over `outputs` (finest first): DeepSupervisionWrapper
  with its weights, 1/2**i with the coarsest's 0, normalised (zero-weight terms skipped), of
  `loss(output, target at its size)`, the target (N, H, W) labels or (N, C, H, W) brought to
  each size as DownsampleSegForDSTransform does (interpolate, mode='nearest-exact')."""
  weights = [1 / 2**i for i in range(len(outputs) - 1)] + [0.0]

  def at(size):
    planes = target if target.ndim == 4 else target[:, None]
    scaled = F.interpolate(planes.float(), size=tuple(size), mode='nearest-exact')
    return (scaled if target.ndim == 4 else scaled[:, 0]).to(target.dtype)

  return sum(w / sum(weights) * loss(o, at(o.shape[-2:]))
             for w, o in zip(weights, outputs, strict=True) if w)


class _MDown(nn.Module):
  def __init__(self, cin, cout, bias):
    super().__init__()
    self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout, bias=bias))

  def forward(self, x):
    return self.maxpool_conv(x)


class _MUp(nn.Module):
  def __init__(self, cin, cout, bilinear, bias):
    super().__init__()
    if bilinear:
      self.up = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)
      self.conv = DoubleConv(cin, cout, cin // 2, bias=bias)
    else:
      self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
      self.conv = DoubleConv(cin, cout, bias=bias)

  def forward(self, x1, x2):
    x1 = self.up(x1)
    dy = x2.size()[2] - x1.size()[2]
    dx = x2.size()[3] - x1.size()[3]
    x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
    return self.conv(torch.cat([x2, x1], dim=1))


class _MOutConv(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size=1)

  def forward(self, x):
    return self.conv(x)


class MilesialUNet(nn.Module):
  def __init__(self, n_channels=3, n_classes=2, bilinear=False, base=64, depth=4, bias=False):
    super().__init__()
    self.depth = depth
    factor = 2 if bilinear else 1
    self.inc = DoubleConv(n_channels, base, bias=bias)
    for k in range(1, depth + 1):
      cout = base * 2**k // (factor if k == depth else 1)
      setattr(self, f'down{k}', _MDown(base * 2**(k - 1), cout, bias))
    for k in range(1, depth + 1):
      level = depth - k
      cout = base * 2**level // factor if level > 0 else base
      setattr(self, f'up{k}', _MUp(base * 2**(level + 1), cout, bilinear, bias))
    self.outc = _MOutConv(base, n_classes)

  def forward(self, x):
    skips = [self.inc(x)]
    for k in range(1, self.depth + 1):
      skips.append(getattr(self, f'down{k}')(skips[-1]))
    x = skips.pop()
    for k in range(1, self.depth + 1):
      x = getattr(self, f'up{k}')(x, skips.pop())
    return self.outc(x)
