"""The DIMSE receiver in-process: negotiation, allowlist, durable C-STORE, out-of-resources."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless
from pynetdicom import AE

from dicom_node.config import AllowedPeer, NodeConfig
from dicom_node.node.receive import Receiver, caller_refusal
from dicom_node.node.send import requestor_handlers
from dicom_node_lab import phantom
from dicom_node_lab.peers import free_port
from dicom_node_lab.phantom_dicom import ct_series

from .test_node_queue import Parts


@pytest.fixture(scope="module")
def slices() -> list[Dataset]:
    p = phantom.generate((4, 32, 32), seed=9)
    return ct_series(p.image, p.spacing)


@pytest.fixture
def receiver(tmp_path: Path):
    parts = Parts(tmp_path)
    parts.cfg.node.port = free_port()
    parts.cfg.node.allowed = [AllowedPeer("SCU", "127.0.0.1")]
    r = Receiver(parts.cfg.node, parts.intake, parts.metrics)
    r.start()
    yield r, parts
    r.stop()
    parts.store.close()


def _associate(port: int, contexts: list[tuple[str, list[str]]], calling: str = "SCU"):
    ae = AE(ae_title=calling)
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", evt_handlers=requestor_handlers(nagle_off=False))


def caller_allowed(cfg: NodeConfig, ae_title: str, address: str) -> bool:
    return caller_refusal(cfg, ae_title, address) is None


def test_allowlist_checks_title_and_host() -> None:
    cfg = NodeConfig(allowed=[AllowedPeer("PACS", "10.1.2.3"), AllowedPeer("LOCAL", "localhost")])
    assert caller_allowed(cfg, "PACS", "10.1.2.3")
    assert not caller_allowed(cfg, "PACS", "10.1.2.4")  # right title, wrong host
    assert not caller_allowed(cfg, "OTHER", "10.1.2.3")
    assert caller_allowed(cfg, "LOCAL", "127.0.0.1")  # host names resolve
    assert caller_allowed(NodeConfig(allowed=[], accept_any_caller=True), "ANY", "1.2.3.4")


def test_uncompressed_is_preferred_and_compressed_accepted(receiver) -> None:
    r, _ = receiver
    assoc = _associate(r.cfg.port, [(CTImageStorage, [JPEGLSLossless, ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
                                    ("1.2.840.10008.5.1.4.1.1.4", [JPEGLSLossless])])
    assert assoc.is_established
    accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted[CTImageStorage] == ExplicitVRLittleEndian
    assert accepted["1.2.840.10008.5.1.4.1.1.4"] == JPEGLSLossless


def test_unknown_caller_is_rejected(receiver) -> None:
    r, parts = receiver
    assoc = _associate(r.cfg.port, [(CTImageStorage, [ExplicitVRLittleEndian])], calling="INTRUDER")
    assert assoc.is_rejected
    assert parts.metrics.associations_rejected.labels("calling_ae")._value.get() == 1


def test_c_store_is_on_disk_before_success(receiver, slices: list[Dataset]) -> None:
    r, parts = receiver
    assoc = _associate(r.cfg.port, [(CTImageStorage, [ExplicitVRLittleEndian]), (CTImageStorage, [RLELossless])])
    rle = copy.deepcopy(slices[1])
    rle.compress(RLELossless)
    for ds in (slices[0], rle):
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
        stored = parts.spool.series_dir(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        assert stored.is_file()  # already there when the response arrived
    assoc.release()
    back = pydicom.dcmread(parts.spool.series_dir(rle.SeriesInstanceUID) / f"{rle.SOPInstanceUID}.dcm")
    assert back.file_meta.TransferSyntaxUID == RLELossless
    assert (back.pixel_array == slices[1].pixel_array).all()
    assert parts.store.list()[0].instances == 2


def test_full_disk_answers_out_of_resources(receiver, slices: list[Dataset]) -> None:
    r, parts = receiver
    parts.spool.min_free = 1 << 62
    assoc = _associate(r.cfg.port, [(CTImageStorage, [ExplicitVRLittleEndian])])
    status = assoc.send_c_store(slices[0])
    assert status.Status == 0xA700
    assert assoc.send_c_store(slices[1]).Status == 0xA700  # the server keeps answering
    assoc.release()
    assert parts.store.list() == []
