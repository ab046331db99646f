"""The Dense-Unet of the paper and the networks it was compared with.

Every network maps the same three input channels (hidden image, mask, calcium
evidence; see :mod:`dicom_node_lab.model.inpaint`) to one channel of normalised HU, at
the input's size. They differ only in how they carry context into the hidden region,
which is what Experiment 1 compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IN_CHANNELS = 3


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class Transition(nn.Sequential):
    """BN + ReLU + 3×3×3 conv between dense blocks, as the paper specifies."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.BatchNorm3d(cin), nn.ReLU(inplace=True),
                         nn.Conv3d(cin, cout, 3, padding=1, bias=False))


def dense_layer(cin: int, growth: int, bottleneck: int) -> nn.Sequential:
    """BN-ReLU-conv3 adding ``growth`` maps; with a 1×1 bottleneck first (DenseNet-BC).

    The bottleneck matters on a CPU: a 3×3×3 conv from a wide concatenation to four
    maps is the slowest shape oneDNN meets, and squeezing to ``bottleneck`` maps first
    makes each layer 3-5× cheaper for the same growth.
    """
    if bottleneck <= 0:
        return nn.Sequential(nn.BatchNorm3d(cin), nn.ReLU(inplace=True),
                             nn.Conv3d(cin, growth, 3, padding=1, bias=False))
    return nn.Sequential(nn.BatchNorm3d(cin), nn.ReLU(inplace=True),
                         nn.Conv3d(cin, bottleneck, 1, bias=False),
                         nn.BatchNorm3d(bottleneck), nn.ReLU(inplace=True),
                         nn.Conv3d(bottleneck, growth, 3, padding=1, bias=False))


class DenseBlock(nn.Module):
    """Each layer sees every earlier feature map; growth rate 4 keeps it cheap."""

    def __init__(self, cin: int, layers: int = 12, growth: int = 4, bottleneck: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(dense_layer(cin + i * growth, growth, bottleneck)
                                    for i in range(layers))
        self.out_channels = cin + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)


class DenseUnet(nn.Module):
    """U-Net encoder/decoder with three 12-layer dense blocks (growth 4).

    The dense blocks work at 1/2, 1/4 and 1/2 resolution: at full resolution their
    many concatenations would dominate CPU time, and a 16³ mask needs the coarse
    levels' receptive field anyway. Full resolution keeps a stem and a head so fine
    edges pass through the skip connection.
    """

    def __init__(self, base: int = 16, layers: int = 12, growth: int = 4):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(IN_CHANNELS, base), conv_bn_relu(base, base))
        self.db1 = DenseBlock(base, layers, growth)
        self.t1 = Transition(self.db1.out_channels, 2 * base)
        self.db2 = DenseBlock(2 * base, layers, growth)
        self.t2 = Transition(self.db2.out_channels, 2 * base)
        self.db3 = DenseBlock(4 * base, layers, growth)
        self.t3 = Transition(self.db3.out_channels, base)
        self.head = nn.Sequential(conv_bn_relu(2 * base, base), nn.Conv3d(base, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x)
        s1 = self.t1(self.db1(F.max_pool3d(s0, 2)))
        b = self.t2(self.db2(F.max_pool3d(s1, 2)))
        d1 = self.t3(self.db3(torch.cat([_up(b), s1], dim=1)))
        return x[:, :1] + self.head(torch.cat([_up(d1), s0], dim=1))


class UNet(nn.Module):
    """Plain 3-level U-Net with two conv-BN-ReLU per level."""

    def __init__(self, base: int = 16):
        super().__init__()
        self.e0 = nn.Sequential(conv_bn_relu(IN_CHANNELS, base), conv_bn_relu(base, base))
        self.e1 = nn.Sequential(conv_bn_relu(base, 2 * base), conv_bn_relu(2 * base, 2 * base))
        self.b = nn.Sequential(conv_bn_relu(2 * base, 4 * base), conv_bn_relu(4 * base, 4 * base))
        self.d1 = nn.Sequential(conv_bn_relu(6 * base, 2 * base), conv_bn_relu(2 * base, 2 * base))
        self.d0 = nn.Sequential(conv_bn_relu(3 * base, base), conv_bn_relu(base, base))
        self.head = nn.Conv3d(base, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.e0(x)
        s1 = self.e1(F.max_pool3d(s0, 2))
        b = self.b(F.max_pool3d(s1, 2))
        d1 = self.d1(torch.cat([_up(b), s1], dim=1))
        d0 = self.d0(torch.cat([_up(d1), s0], dim=1))
        return x[:, :1] + self.head(d0)


class DenseNet(nn.Module):
    """Three dense blocks at full resolution, no down- or up-sampling."""

    def __init__(self, base: int = 16, layers: int = 12, growth: int = 4):
        super().__init__()
        self.stem = conv_bn_relu(IN_CHANNELS, base)
        blocks: list[nn.Module] = []
        cin = base
        for i in range(3):
            db = DenseBlock(cin, layers, growth)
            cout = base if i == 2 else 2 * base
            blocks += [db, Transition(db.out_channels, cout)]
            cin = cout
        self.body = nn.Sequential(*blocks)
        self.head = nn.Conv3d(base, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] + self.head(self.body(self.stem(x)))


class AutoEncoder(nn.Module):
    """Convolutional autoencoder: a 4³ bottleneck and no skip connections."""

    def __init__(self, base: int = 16):
        super().__init__()
        chans = [base, 2 * base, 4 * base, 8 * base]
        enc: list[nn.Module] = [conv_bn_relu(IN_CHANNELS, chans[0])]
        for a, b in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv3d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(b),
                    nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = []
        for a, b in zip(chans[::-1][:-1], chans[::-1][1:]):
            dec += [nn.Upsample(scale_factor=2.0, mode="trilinear", align_corners=False),
                    conv_bn_relu(a, b)]
        self.decoder = nn.Sequential(*dec, nn.Conv3d(chans[0], 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


NETWORKS: dict[str, type[nn.Module]] = {
    "dense_unet": DenseUnet,
    "unet": UNet,
    "densenet": DenseNet,
    "autoencoder": AutoEncoder,
}


def build(name: str) -> nn.Module:
    """Instantiate a network by its registry name."""
    try:
        return NETWORKS[name]()
    except KeyError:
        raise ValueError(f"unknown network {name!r}; choose from {sorted(NETWORKS)}") from None
