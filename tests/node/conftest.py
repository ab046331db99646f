"""Fixtures the node's tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom import _config


@pytest.fixture(scope="module")
def raw_sending() -> Iterator[None]:
    """pynetdicom sends a file's bytes as they are (no decode, no re-encode): truncated stays truncated."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = before
