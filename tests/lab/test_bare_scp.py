"""The benchmark's bare pynetdicom receiver (issue 19's ceiling) must really store what it acknowledges.

If it answered Success without writing, or wrote without the data, its rate would be a ceiling of
nothing: the figure the notes compare the node with would be false.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_node.node.send import requestor_handlers
from dicom_node_lab import bare_scp
from dicom_node_lab.peers import free_port
from dicom_node_lab.phantom import generate
from dicom_node_lab.phantom_dicom import write_phantom_series

pytestmark = pytest.mark.integration


def test_bare_receiver_writes_every_acknowledged_instance(tmp_path: Path) -> None:
    files = sorted(write_phantom_series(generate(seed=3), tmp_path / "in"))[:5]
    port, out = free_port(), tmp_path / "out"
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=bare_scp.serve, args=(port, out, "BARE", ready, stop), daemon=True)
    server.start()
    assert ready.wait(10)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="BARE", evt_handlers=requestor_handlers(nagle_off=False))
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()
        stop.set()
        server.join(10)
    assert statuses == [bare_scp.SUCCESS] * len(files)
    stored = sorted(out.glob("*.dcm"))
    assert len(stored) == len(files) and not list(out.glob(".*.part"))
    sent = {str(ds.SOPInstanceUID): ds.pixel_array for ds in map(pydicom.dcmread, files)}
    for f in stored:
        ds = pydicom.dcmread(f)
        assert (ds.pixel_array == sent[str(ds.SOPInstanceUID)]).all()
