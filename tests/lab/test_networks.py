from __future__ import annotations

import pytest
import torch

from dicom_node_lab.model import networks
from dicom_node_lab.model.inpaint import Inpainter


@pytest.mark.parametrize("name", sorted(networks.NETWORKS))
def test_output_is_input_sized(name):
    net = networks.build(name).eval()
    x = torch.randn(2, networks.IN_CHANNELS, 32, 32, 32)
    assert net(x).shape == (2, 1, 32, 32, 32)


def test_dense_unet_is_the_papers_shape():
    net = networks.DenseUnet()
    blocks = [m for m in net.modules() if isinstance(m, networks.DenseBlock)]
    assert len(blocks) == 3
    for b in blocks:
        assert len(b.layers) == 12
        assert b.out_channels - b.layers[0][0].num_features == 12 * 4  # growth rate 4
    transitions = [m for m in net.modules() if isinstance(m, networks.Transition)]
    assert transitions and all(isinstance(t[0], torch.nn.BatchNorm3d) and isinstance(t[1], torch.nn.ReLU)
                               and t[2].kernel_size == (3, 3, 3) for t in transitions)


def test_inpainter_keeps_unmasked_voxels_exactly():
    model = Inpainter(networks.build("dense_unet")).eval()
    image = torch.randn(1, 1, 32, 32, 32) * 300
    mask = torch.zeros_like(image)
    mask[..., 8:24, 8:24, 8:24] = 1
    with torch.no_grad():
        out = model(image, mask)
    assert torch.equal(out[mask == 0], image[mask == 0])
    assert not torch.equal(out[mask == 1], image[mask == 1])


def test_masked_content_is_hidden_except_calcium_evidence():
    """Changing lumen-range values under the mask must not change the output (no leak)."""
    model = Inpainter(networks.build("unet")).eval()
    image = torch.full((1, 1, 32, 32, 32), 40.0)
    mask = torch.zeros_like(image)
    mask[..., 8:24, 8:24, 8:24] = 1
    other = image.clone()
    other[mask == 1] = 550.0  # contrast lumen, below calcium evidence
    with torch.no_grad():
        assert torch.allclose(model(image, mask), model(other, mask).where(mask == 1, image))
        calc = image.clone()
        calc[..., 14:18, 14:18, 14:18] = 1500.0
        assert not torch.allclose(model(image, mask), model(calc, mask).where(mask == 1, image))
