"""Fixtures the node's tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from dicom_node.node.send import requestor_handlers

SUCCESS = 0x0000


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


def send_scu(port: int, files: list[Path], on_success: Any = None) -> dict[str, int | None]:
    """C-STORE the files one by one over one association, as a PACS does; SOP UID -> status (None: no answer).

    ``on_success(n)`` runs after the n-th success, while the association goes on.
    """
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", evt_handlers=requestor_handlers(nagle_off=False))
    assert assoc.is_established, "the node refused the association"
    out: dict[str, int | None] = {}
    try:
        for f in files:
            ds = pydicom.dcmread(f)
            status = None
            if assoc.is_established:
                try:
                    answer = assoc.send_c_store(ds)
                    status = int(answer.Status) if answer is not None and "Status" in answer else None
                except (RuntimeError, OSError):  # the association died under us
                    status = None
            out[str(ds.SOPInstanceUID)] = status
            if status == SUCCESS and on_success is not None:
                on_success(sum(s == SUCCESS for s in out.values()))
    finally:
        if assoc.is_established:
            assoc.release()
    return out
