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


def postgres_cluster():
    """A private PostgreSQL cluster (peers.PostgresCluster), started; the caller removes it.

    Where PostgreSQL is not installed the PostgreSQL tests are skipped, saying so, except under CI
    (``CI`` set), which installs it (.ci/run) and must never pass them by skipping.
    """
    import os
    import shutil
    from pathlib import Path

    from dicom_node_lab.peers import PostgresCluster

    installed = shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not installed and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)")
    return PostgresCluster().start()
