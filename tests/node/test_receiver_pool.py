"""Several receiver processes behind one listener (issue 19, ``node.receiver_processes``): associations go
to the least busy process, what the children count reaches the node's metrics and completion, the connection
limits hold for the whole node, and a receiver process that dies is replaced while the node keeps serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.config import AllowedPeer
from dicom_node.node.receive_pool import ReceiverPool
from dicom_node.node.send import requestor_handlers
from dicom_node_lab import phantom
from dicom_node_lab.peers import free_port, wait_for
from dicom_node_lab.phantom_dicom import ct_series

from .test_node_limits import _closed_by_peer
from .test_node_queue import Parts
from .test_node_security import _echo as _tls_echo
from .test_node_security import _tls, pki, series  # noqa: F401 - the PKI and series fixtures

pytestmark = pytest.mark.integration


def _pool(tmp_path: Path, processes: int = 2, **node: object) -> tuple[ReceiverPool, Parts]:
    parts = Parts(tmp_path)
    parts.cfg.node.port = free_port()
    parts.cfg.node.allowed = [AllowedPeer("SCU", "127.0.0.1")]
    parts.cfg.node.receiver_processes = processes
    for k, v in node.items():
        setattr(parts.cfg.node, k, v)
    pool = ReceiverPool(parts.cfg, parts.intake, parts.metrics, processes)
    pool.start()
    return pool, parts


@pytest.fixture
def pool(tmp_path: Path):
    p, parts = _pool(tmp_path, request_seconds=1.0, max_connections_per_host=4)
    yield p, parts
    p.stop()
    parts.store.close()


def _associate(port: int, store: bool = True):
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage if store else Verification, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", evt_handlers=requestor_handlers(nagle_off=False))
    assert assoc.is_established
    return assoc


def _series(seed: int, slices: int = 3) -> list[Dataset]:
    p = phantom.generate((slices, 32, 32), seed=seed)
    return ct_series(p.image, p.spacing)


def _value(counter) -> float:  # noqa: ANN001 - a prometheus child
    return float(counter._value.get())


def test_associations_are_spread_and_what_the_children_count_reaches_the_node(pool) -> None:
    p, parts = pool
    hints: list[list[int]] = []
    parts.intake.on_released = lambda ids, _at, _why: hints.append(ids)
    studies = [_series(seed) for seed in (1, 2, 3, 4)]
    assocs = [_associate(p.cfg.node.port) for _ in studies]  # all four open at once
    for assoc, slices in zip(assocs, studies, strict=True):
        for ds in slices:
            assert assoc.send_c_store(ds).Status == 0x0000
    for assoc in assocs:
        assoc.release()
    handed = [_value(parts.metrics.connections_handed.labels(str(i))) for i in range(2)]
    assert handed == [2.0, 2.0], f"four open associations over two processes, the least busy first: {handed}"
    wait_for(lambda: _value(parts.metrics.instances.labels("dimse", "processed")) == 12, 5,
             "the children's counters in the node's metrics")
    assert len(list((Path(parts.cfg.spool.dir) / "series").rglob("*.dcm"))) == 12
    jobs = parts.store.list()
    assert sorted(j.instances for j in jobs) == [3, 3, 3, 3]
    wait_for(lambda: sorted(j for ids in hints for j in ids) == sorted(j.id for j in jobs), 5,
             "a completion hint for each released series")
    wait_for(lambda: p.limits.open() == 0, 5, "every connection counted out of the node's limits")


def test_the_connection_limits_count_for_the_whole_node(pool) -> None:
    p, parts = pool
    idle = [socket.create_connection(("127.0.0.1", p.cfg.node.port)) for _ in range(5)]
    time.sleep(0.3)
    refused = [s for s in idle if _closed_by_peer(s, 0.05)]
    assert len(refused) == 1, "four connections from one host at most, over both processes together"
    assert _value(parts.metrics.connections_refused.labels("dimse", "per_host")) == 1
    held = [s for s in idle if s not in refused]
    assert all(_closed_by_peer(s, 3.0) for s in held), "idle callers are dropped after request_seconds"
    wait_for(lambda: p.limits.open() == 0, 5, "the dropped connections counted out")
    wait_for(lambda: _value(parts.metrics.connections_refused.labels("dimse", "no_request")) == len(held), 5,
             "the children's refusals in the node's metrics")
    for s in idle:
        s.close()


def test_a_receiver_process_that_dies_is_replaced(pool) -> None:
    p, parts = pool
    doomed = p.children[0].proc
    assert doomed is not None
    held = _associate(p.cfg.node.port, store=False)  # goes to process 0 (both idle, neither handed any)
    os.kill(doomed.pid, signal.SIGKILL)
    wait_for(lambda: _value(parts.metrics.receiver_restarts) == 1, 10, "the dead process noticed")
    wait_for(lambda: p.children[0].ready.is_set() and p.children[0].proc is not doomed, 30, "a new process ready")
    assert p.limits.open() == 0, "the dead process's connection is counted out"
    for _ in range(3):  # both processes take and run associations again
        assoc = _associate(p.cfg.node.port, store=False)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    held.abort()


def test_tls_through_the_pool(tmp_path: Path, pki: Path, series: Path) -> None:  # noqa: F811 - imported fixtures
    """The parent hands over the raw connection; the child shakes hands with the node's certificate and
    checks the caller's, exactly as a one-process node does, and its refusals reach the node's metrics."""
    import requests

    from dicom_node_lab.peers import NODELAY, NodeProcess, need, write_node_config

    dicom_port, tls_port, http_port = free_port(), free_port(), free_port()
    extra = {"node": ["receiver_processes = 2"],
             "node.tls": ["enabled = true", f"port = {tls_port}", f'cert = "{pki / "server.pem"}"',
                          f'key = "{pki / "server.key"}"', f'ca = "{pki / "ca.pem"}"', "handshake_seconds = 4.0"]}
    cfg = write_node_config(tmp_path, dicom_port=dicom_port, http_port=http_port, destinations=[], quiet=600,
                            allowed=[("ECHOSCU", "127.0.0.1"), ("STORESCU", "127.0.0.1")], extra=extra)
    node = NodeProcess(cfg, http_port, dicom_port, tmp_path / "node.log").start()
    try:
        out = subprocess.run([need("storescu"), *_tls(pki), "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
                              str(tls_port), "+sd", str(series)], capture_output=True, text=True, env=NODELAY,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _tls_echo(tls_port, *_tls(pki, "intruder")).returncode != 0  # another CA's certificate
        assert _tls_echo(tls_port).returncode != 0  # plain DICOM to the TLS port
        assert _tls_echo(tls_port, *_tls(pki)).returncode == 0  # and trusted callers are still served
        log = (tmp_path / "node.log").read_text()
        assert "over TLS, client certificates required, 2 receiver processes" in log
        assert "client certificate refused" in log
        metrics = wait_for(lambda: (lambda text: text if 'dicom_node_associations_rejected_total{reason="tls"} 2.0'
                                    in text else None)(requests.get(f"{node.url}/metrics", timeout=5).text), 5,
                           "the children's TLS refusals in the node's metrics")
        files = len(list(series.glob("*.dcm")))
        assert f'dicom_node_instances_received_total{{kind="processed",via="dimse"}} {files:.1f}' in metrics
    finally:
        node.stop()


def test_a_release_is_a_hint_only_when_no_process_still_sends_the_series(tmp_path: Path) -> None:
    """The parent's rule, message by message: process 1 still sends job 7 when process 0's association that
    sent it is released, so no hint; when process 1's ends too, the hint goes out. Counters add up."""
    parts = Parts(tmp_path)
    hints: list[list[int]] = []
    parts.intake.on_released = lambda ids, _at, _why: hints.append(ids)
    pool = ReceiverPool(parts.cfg, parts.intake, parts.metrics, 2)  # not started: messages fed by hand
    first, second = pool.children
    pool._on_message(first, {"senders": [7, True]})
    pool._on_message(second, {"senders": [7, True]})
    pool._on_message(first, {"senders": [8, True]})
    pool._on_message(first, {"senders": [7, False]})
    pool._on_message(first, {"senders": [8, False]})
    pool._on_message(first, {"released": [[7, 8], time.time(), "released"]})
    assert hints == [[8]], "job 7 is still being sent by the other process"
    pool._on_message(second, {"senders": [7, False]})
    pool._on_message(second, {"released": [[7], time.time(), "released"]})
    assert hints == [[8], [7]]
    pool._on_message(first, {"metrics": [["instances", ["dimse", "processed"], 3], ["aborted_associations", [], 1],
                                         ["job_crashes", [], 5]]})  # not a receiver's counter: ignored
    assert _value(parts.metrics.instances.labels("dimse", "processed")) == 3
    assert _value(parts.metrics.aborted_associations) == 1 and _value(parts.metrics.job_crashes) == 0
    parts.store.close()
