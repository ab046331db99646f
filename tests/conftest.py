"""Shared fixtures: small phantoms are cheap, so tests render their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node_lab import phantom

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def calcified_phantoms() -> list[phantom.Phantom]:
    """A handful of training-sized volumes that contain calcium."""
    out = []
    seed = 100
    while len(out) < 4:
        p = phantom.generate(seed=seed)
        seed += 1
        if p.calcium_mask.any():
            out.append(p)
    return out
