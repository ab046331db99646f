"""The exported graph: raw HU and a mask in, restored HU out.

Normalisation lives here, inside the graph, so no backend or outside tool can get
it wrong. Masked voxels are hidden from the network, as in the paper, with one
exception: the part of the hidden region that is brighter than any contrast lumen
(``CALCIUM_EVIDENCE_HU``) is passed in a separate channel. That tells the network
where the calcium is, and so where the plaque's footprint must stay tissue instead
of being painted over with lumen, without showing it the lumen under the mask.
"""

from __future__ import annotations

import torch
from torch import nn

HU_CENTRE = 100.0
HU_SCALE = 500.0
HU_MIN, HU_MAX = -1024.0, 3071.0
CALCIUM_EVIDENCE_HU = 700.0
CALCIUM_EVIDENCE_SCALE = 1000.0


def network_inputs(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Build the three network channels from raw HU and a 0/1 mask."""
    norm = (image.clamp(HU_MIN, HU_MAX) - HU_CENTRE) / HU_SCALE
    hidden = norm * (1.0 - mask)
    calcium = ((image - CALCIUM_EVIDENCE_HU) / CALCIUM_EVIDENCE_SCALE).clamp(0.0, 1.5) * mask
    return torch.cat([hidden, mask, calcium], dim=1)


def to_hu(pred: torch.Tensor) -> torch.Tensor:
    return pred * HU_SCALE + HU_CENTRE


def to_norm(hu: torch.Tensor) -> torch.Tensor:
    return (hu - HU_CENTRE) / HU_SCALE


class Inpainter(nn.Module):
    """Wraps a network with the ONNX contract: ``restored = f(image, mask)`` in HU.

    Outside the mask the output is the input, bit for bit, so callers may paste the
    whole patch back; inside it is the network's restoration.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network's whole-patch prediction in normalised units (used for the loss)."""
        return self.network(network_inputs(image, mask))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        restored = to_hu(self.predict(image, mask))
        return torch.where(mask > 0.5, restored, image)
