"""An independent PyTorch rendering of the standard BiSeNet face parser (test reference only).

Written from the architecture description (ResNet18 context path, attention refinement modules,
feature fusion module, three output heads; res3b1 feature in place of a spatial path) so that its
`state_dict()` has exactly the key names of zllrunning's `79999_iter.pth` / `face_parsing.pth`,
e.g. `cp.resnet.layer1.0.conv1.weight`, `cp.arm16.bn_atten.running_var`, `ffm.convblk.bn.bias`,
`conv_out16.conv_out.weight`. NCHW, as in the original. Used by tests/test_bisenet.py for parity.
"""
import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin, cout, k, stride=1, pad=None):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if pad is None else pad, bias=False)


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.conv = _conv(cin, cout, k)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Block(nn.Module):
    """ResNet basic block with an optional (conv1x1, BN) `downsample` Sequential."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv(cout, cout, 3)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(_conv(cin, cout, 1, stride, 0), nn.BatchNorm2d(cout))
                           if (cin != cout or stride != 1) else None)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(skip + y)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = _conv(3, 64, 7, 2, 3)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (cin, cout, s) in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(Block(cin, cout, s), Block(cout, cout, 1)))

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        f8 = self.layer2(x)
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


class ARM(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.conv_atten = _conv(cout, cout, 1, 1, 0)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        f = self.conv(x)
        a = f.mean(dim=(2, 3), keepdim=True)
        return f * torch.sigmoid(self.bn_atten(self.conv_atten(a)))


class Context(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Backbone()
        self.arm16 = ARM(256, 128)
        self.arm32 = ARM(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        g = self.conv_avg(f32.mean(dim=(2, 3), keepdim=True))
        s32 = self.arm32(f32) + F.interpolate(g, size=f32.shape[2:], mode="nearest")
        up32 = self.conv_head32(F.interpolate(s32, size=f16.shape[2:], mode="nearest"))
        s16 = self.arm16(f16) + up32
        up16 = self.conv_head16(F.interpolate(s16, size=f8.shape[2:], mode="nearest"))
        return f8, up16, up32


class FFM(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = _conv(cout, cout // 4, 1, 1, 0)
        self.conv2 = _conv(cout // 4, cout, 1, 1, 0)

    def forward(self, a, b):
        f = self.convblk(torch.cat([a, b], dim=1))
        w = torch.sigmoid(self.conv2(torch.relu(self.conv1(f.mean(dim=(2, 3), keepdim=True)))))
        return f + f * w


class Head(nn.Module):
    def __init__(self, cin, mid, n):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.conv_out = _conv(mid, n, 1, 1, 0)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNetRef(nn.Module):
    def __init__(self, n_classes=19):
        super().__init__()
        self.cp = Context()
        self.ffm = FFM(256, 256)
        self.conv_out = Head(256, 256, n_classes)
        self.conv_out16 = Head(128, 64, n_classes)
        self.conv_out32 = Head(128, 64, n_classes)

    def forward(self, x):
        size = x.shape[2:]
        f8, cp8, cp16 = self.cp(x)
        heads = (self.conv_out(self.ffm(f8, cp8)), self.conv_out16(cp8), self.conv_out32(cp16))
        return tuple(F.interpolate(h, size=size, mode="bilinear", align_corners=True) for h in heads)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomises every parameter and BN buffer so that no layout mistake can hide behind an init."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        r = torch.rand(t.shape, generator=g)
        if name.endswith("running_var"):
            t.copy_(0.5 + r)
        elif name.endswith("running_mean"):
            t.copy_(0.2 * (r - 0.5))
        elif t.ndim == 1 and name.endswith("weight"):  # BN affine scale (all convs are 4-D)
            t.copy_(0.8 + 0.4 * r)
        elif name.endswith("bias"):
            t.copy_(0.2 * (r - 0.5))
        else:  # conv kernels: keep the kaiming scale, add a random perturbation on top
            t.add_(0.3 * t.std() * torch.randn(t.shape, generator=g))
    return model.eval()
