"""The exported graph: raw HU and a mask in, restored HU out.

Normalisation lives here, inside the graph, so no backend or outside tool can get
it wrong. Two input designs exist, chosen at training time and recorded in the model:

``hidden`` (the paper): masked voxels are hidden from the network, with one
exception: the part of the hidden region brighter than any contrast lumen
(``CALCIUM_EVIDENCE_HU``) is passed in a separate channel, so the network knows
where the plaque's footprint must stay tissue. The lumen under the mask has to be
guessed from the context, and a guess breaks thin lumens (Experiment 2).

``observed`` (the shipped engine): the network also sees the acquired values under
the mask and predicts a correction that can only lower them. Calcium and its
blooming only ever add density, so the calcium-free image is never brighter than
the acquired one; the lumen that is partly visible through the blooming is kept
rather than re-invented. The mask still bounds what may change.
"""

from __future__ import annotations

import torch
from torch import nn

HU_CENTRE = 100.0
HU_SCALE = 500.0
HU_MIN, HU_MAX = -1024.0, 3071.0
CALCIUM_EVIDENCE_HU = 700.0
CALCIUM_EVIDENCE_SCALE = 1000.0


INPUT_MODES = ("hidden", "observed")


def network_inputs(image: torch.Tensor, mask: torch.Tensor, observed: bool = False) -> torch.Tensor:
    """Build the three network channels from raw HU and a 0/1 mask."""
    norm = (image.clamp(HU_MIN, HU_MAX) - HU_CENTRE) / HU_SCALE
    seen = norm if observed else norm * (1.0 - mask)
    calcium = ((image - CALCIUM_EVIDENCE_HU) / CALCIUM_EVIDENCE_SCALE).clamp(0.0, 1.5) * mask
    return torch.cat([seen, mask, calcium], dim=1)


def to_hu(pred: torch.Tensor) -> torch.Tensor:
    return pred * HU_SCALE + HU_CENTRE


def to_norm(hu: torch.Tensor) -> torch.Tensor:
    return (hu - HU_CENTRE) / HU_SCALE


class Inpainter(nn.Module):
    """Wraps a network with the ONNX contract: ``restored = f(image, mask)`` in HU.

    Outside the mask the output is the input, bit for bit, so callers may paste the
    whole patch back; inside it is the network's restoration.
    """

    def __init__(self, network: nn.Module, inputs: str = "hidden"):
        super().__init__()
        if inputs not in INPUT_MODES:
            raise ValueError(f"unknown input mode {inputs!r}; choose from {INPUT_MODES}")
        self.network = network
        self.observed = inputs == "observed"

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network's whole-patch prediction in normalised units (used for the loss).

        In ``observed`` mode the network predicts a correction to the acquired image. It is
        trained unconstrained: clamping here would stop the gradient wherever the network
        happens to start out positive, and it never learns.
        """
        out = self.network(network_inputs(image, mask, self.observed))
        return to_norm(image) + out if self.observed else out

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        restored = to_hu(self.predict(image, mask))
        if self.observed:  # removing calcium never adds density
            restored = torch.minimum(restored, image)
        return torch.where(mask > 0.5, restored, image)
