"""Bad input: every case of tests/node/badinput.py gets its documented outcome, and the node keeps serving.

The in-process tests check what a sender cannot see (the quarantine, memory, exact decoding) in
milliseconds; the integration tests send the same corpus to a real ``dicom-node serve`` over
C-STORE and STOW-RS, with a C-ECHO and a good instance after every case.
"""

from __future__ import annotations

import io
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.node.http import create_app
from dicom_node.node.intake import SUCCESS
from dicom_node.node.send import requestor_handlers
from dicom_node.pipeline.series import SeriesError, load_hu, order_series, read_ct_series
from dicom_node_lab.peers import NodeProcess, free_port, wait_for, write_node_config

from . import badinput as bi
from .test_node_queue import Parts

INSTANCE = [c for c in bi.CASES if c.kind == "instance"]
SERIES = [c for c in bi.CASES if c.kind == "series"]
STORED = [c for c in bi.CASES if c.kind == "stored"]
BODY = [c for c in bi.CASES if c.kind == "body"]
FAILING = [c for c in SERIES if c.job == "failed"]
CALLING = "BADINPUT"


def _ids(cases: list[bi.Case]) -> list[str]:
    return [c.name for c in cases]


def _series_param(c: bi.Case) -> Any:
    return pytest.param(c, id=c.name)


def _refused_notes(spool: Path, phrase: str, via: str) -> list[dict[str, Any]]:
    """The quarantine's .json notes whose reason has ``phrase``, for instances that came ``via``."""
    notes = [json.loads(p.read_text()) for p in (spool / "quarantine" / "refused").glob("*/*.json")]
    return [n for n in notes if phrase in n["reason"] and n["via"] == via]


def _ds(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


# -- in process --------------------------------------------------------------------------------
def test_docs_table_is_generated_from_the_corpus() -> None:
    assert bi.DOC.is_file(), "docs/bad-input.md is missing"
    assert bi.outcome_table() in bi.DOC.read_text(), "docs/bad-input.md is stale: run python -m tests.node.badinput"
    readme = (bi.REPO / "README.md").read_text()
    assert "docs/bad-input.md" in readme


@pytest.mark.parametrize("case", INSTANCE, ids=_ids(INSTANCE))
def test_intake_refuses_and_quarantines(case: bi.Case, tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    try:
        *earlier, last = bi.instance_case(case.name, tmp_path)
        for data in earlier:
            assert parts.intake.accept(data, _ds(data), "dimse").status == SUCCESS
        try:
            ds = _ds(last)
        except RecursionError:  # pydicom's decoder gives up on it, quickly: both doors refuse it as undecodable
            assert case.reason == "RecursionError"  # (their answers are checked over C-STORE and STOW-RS below)
            return
        result = parts.intake.accept(last, ds, "dimse")
        assert (result.status, case.reason in result.reason) == (case.status, True), result
        [note] = _refused_notes(parts.spool.root, case.reason, "dimse")
        assert note["status"] == f"0x{case.status:04X}" and note["bytes"] == len(last)
        kept = list((parts.spool.root / "quarantine" / "refused").glob("*/*.dcm"))
        assert [p.read_bytes() for p in kept] == [last], "the refused bytes are kept as they came"
        assert len(parts.store.list()) == (1 if earlier else 0), "a refused instance joins no job"
    finally:
        parts.store.close()


@pytest.mark.parametrize("case", FAILING, ids=_ids(FAILING))
def test_failed_job_quarantines_its_input(case: bi.Case, tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    try:
        sent = bi.series_case(case.name, tmp_path)
        for ds in sent:
            data = bi.part10(ds)
            assert parts.intake.accept(data, _ds(data), "dimse").status == SUCCESS
        parts.store.queue_quiet(0, time.time() + 1)
        assert parts.workers().run_one()  # every failing case fails before the engine is needed
        [job] = parts.store.list()
        assert job.state == "failed" and case.reason in job.reason, job.reason
        folder = parts.spool.root / "quarantine" / f"job-{job.id}"
        assert f"[input kept in quarantine/job-{job.id}]" in job.reason
        note = json.loads((folder / "REASON.json").read_text())
        assert case.reason in note["reason"] and note["instances"] == len(sent)
        assert len(list(folder.glob("*.dcm"))) == len(sent)
        assert len(parts.spool.series_files(job.series_uid)) == len(sent), "the series stays for a re-send"
    finally:
        parts.store.close()


def test_huge_declared_size_allocates_nothing(tmp_path: Path) -> None:
    """65535x65535 is refused from the header; 4096x4096 over a 48x48 codestream fails at its first slice."""
    parts = Parts(tmp_path)
    try:
        [huge] = bi.instance_case("huge_size", tmp_path)
        tracemalloc.start()
        try:
            assert parts.intake.accept(huge, _ds(huge), "stow").status == 0xA900
            forged = [bi.encode(ds, JPEGLSLossless, tmp_path) for ds in bi.good_series()]
            for ds in forged:
                ds.Rows = ds.Columns = 4096  # within MAX_MATRIX, so only decoding can tell
                parts.spool.write_instance(ds.SeriesInstanceUID, ds.SOPInstanceUID, bi.part10(ds))
            [series], _ = read_ct_series([parts.spool.series_dir(forged[0].SeriesInstanceUID)])
            with pytest.raises(SeriesError, match="slice 1 .* (decodes to|cannot be decoded)"):
                load_hu(series)
            headers = [(Path(f"{i}"), ds) for i, ds in enumerate(bi.good_series())]
            for _, ds in headers:
                ds.Rows = ds.Columns = 65535
            with pytest.raises(SeriesError, match="Rows 65535 is outside"):
                order_series("huge", headers)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, f"peak {peak >> 20} MiB"
    finally:
        parts.store.close()


@pytest.mark.parametrize("ts", sorted(bi.LOSSLESS), ids=lambda ts: pydicom.uid.UID(ts).keyword)
def test_lossless_syntaxes_decode_to_the_same_hu(ts: str, tmp_path: Path) -> None:
    source = bi.good_series()
    for folder, series in (("plain", source), ("encoded", [bi.encode(ds, ts, tmp_path) for ds in source])):
        (tmp_path / folder).mkdir()
        for ds in series:
            ds.save_as(tmp_path / folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    [plain], _ = read_ct_series([tmp_path / "plain"])
    [encoded], notes = read_ct_series([tmp_path / "encoded"])
    assert notes == []
    assert np.array_equal(load_hu(plain), load_hu(encoded))


@pytest.mark.parametrize("case", BODY, ids=_ids(BODY))
def test_stow_body_cases_in_process(case: bi.Case, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    parts = Parts(tmp_path)
    try:
        client = TestClient(create_app(parts.store, parts.intake, parts.metrics, {}))
        good = bi.part10(bi.good_series()[0])
        body, ctype = bi.body_case(case.name, good)
        r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        _check_stow_answer(r, case)
        assert parts.store.list() == [], "nothing from a refused request joins a job"
    finally:
        parts.store.close()


def _check_stow_answer(r: requests.Response | Any, case: bi.Case) -> None:
    assert r.status_code == case.http, r.text
    if case.http == 409:
        failed = Dataset.from_json(r.json()).FailedSOPSequence
        assert [item.FailureReason for item in failed] == [case.status]
        assert case.reason in r.headers["warning"], r.headers.get("warning")
    else:
        assert case.reason in r.json()["detail"]


# -- against the real node ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("badinput-node")
    dicom_port, http_port = free_port(), free_port()
    cfg = write_node_config(root, dicom_port=dicom_port, http_port=http_port, destinations=[],
                            allowed=[(CALLING, "127.0.0.1")], quiet=2.0)  # no series split by a slow send
    proc = NodeProcess(cfg, http_port, dicom_port, root / "node.log")
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def spool(node: NodeProcess) -> Path:
    return node.config.parent / "spool"


def _write(folder: Path, files: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(files):
        paths.append(folder / f"{i:03d}.dcm")
        paths[-1].write_bytes(data)
    return paths


def c_store(node: NodeProcess, paths: list[Path]) -> list[int]:
    """Send files in one association, each in its own transfer syntax; the status of each."""
    ae = AE(ae_title=CALLING)
    contexts = set()
    for p in paths:
        meta = pydicom.filereader.read_file_meta_info(p)
        contexts.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    for sop, ts in sorted(contexts):
        ae.add_requested_context(sop, ts)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="DICOMNODE",
                         evt_handlers=requestor_handlers())  # Nagle off (else ~40 ms per instance), reactor gated
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def stow(node: NodeProcess, body: bytes, ctype: str) -> requests.Response:
    return requests.post(f"{node.url}/dicomweb/studies", data=body, headers={"Content-Type": ctype}, timeout=30)


def still_serving(node: NodeProcess, tmp: Path) -> None:
    """A C-ECHO, and a good instance over both routes (an SR: stored, no job to wait for)."""
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="DICOMNODE", evt_handlers=requestor_handlers())
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    sr = bi.part10(bi.stored_case("sr"))
    assert c_store(node, _write(tmp / "alive", [sr])) == [0x0000]
    assert stow(node, *bi.multipart([bi.part10(bi.stored_case("sr"))])).status_code == 200
    assert requests.get(f"{node.url}/healthz", timeout=5).json()["status"] == "ok"


@pytest.mark.integration
@pytest.mark.parametrize("case", INSTANCE, ids=_ids(INSTANCE))
def test_instance_case_over_c_store(case: bi.Case, node: NodeProcess, spool: Path, raw_sending: None,
                                    tmp_path: Path) -> None:
    files = bi.instance_case(case.name, tmp_path)
    statuses = c_store(node, _write(tmp_path / "send", files))
    assert statuses == [0x0000] * (len(files) - 1) + [case.status]
    assert _refused_notes(spool, case.reason, "dimse"), "refused, so quarantined with the reason"
    still_serving(node, tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("case", INSTANCE, ids=_ids(INSTANCE))
def test_instance_case_over_stow(case: bi.Case, node: NodeProcess, spool: Path, raw_sending: None,
                                 tmp_path: Path) -> None:
    *earlier, last = bi.instance_case(case.name, tmp_path)
    for data in earlier:
        assert stow(node, *bi.multipart([data])).status_code == 200
    _check_stow_answer(stow(node, *bi.multipart([last])), case)
    assert _refused_notes(spool, case.reason, "stow")
    still_serving(node, tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("case", BODY, ids=_ids(BODY))
def test_broken_stow_request(case: bi.Case, node: NodeProcess, spool: Path, raw_sending: None,
                             tmp_path: Path) -> None:
    good = bi.part10(bi.good_series()[0])
    body, ctype = bi.body_case(case.name, good)
    _check_stow_answer(stow(node, body, ctype), case)
    series = spool / "series" / str(_ds(good).SeriesInstanceUID)
    assert not series.exists(), "nothing of a refused request is stored as received"
    still_serving(node, tmp_path)


@pytest.fixture(scope="module")
def sent(node: NodeProcess, raw_sending: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every series-level and stored-only case, sent once (a case's instances in one association);
    the Series Instance UIDs of each."""
    tmp = tmp_path_factory.mktemp("badinput-series")
    out: dict[str, list[str]] = {}
    for case in SERIES + STORED:
        datasets = bi.series_case(case.name, tmp) if case.kind == "series" else [bi.stored_case(case.name)]
        statuses = c_store(node, _write(tmp / case.name, [bi.part10(ds) for ds in datasets]))
        assert statuses == [0x0000] * len(datasets), case.name
        out[case.name] = sorted({str(ds.SeriesInstanceUID) for ds in datasets})
    return out


def _finished_jobs(node: NodeProcess, series_uid: str) -> list[dict[str, Any]] | None:
    jobs = node.jobs(series=series_uid)
    return jobs if jobs and all(j["state"] in ("done", "failed") for j in jobs) else None


@pytest.mark.integration
@pytest.mark.parametrize("case", [_series_param(c) for c in SERIES])
def test_series_case_job_outcome(case: bi.Case, node: NodeProcess, spool: Path, sent: dict[str, list[str]]) -> None:
    for uid in sent[case.name]:
        [job] = wait_for(lambda uid=uid: _finished_jobs(node, uid), 120, f"the job of {case.name}")
        assert job["state"] == case.job and case.reason in job["reason"], job["reason"]
        files = list((spool / "series" / uid).glob("*.dcm"))
        assert files, "received instances stay in the spool"
        if case.job == "failed":
            note = json.loads((spool / "quarantine" / f"job-{job['id']}" / "REASON.json").read_text())
            assert case.reason in note["reason"] and note["instances"] == len(files)
        else:
            assert len(list((spool / "out" / str(job["id"])).rglob("*.dcm"))) >= len(files)


@pytest.mark.integration
@pytest.mark.parametrize("case", STORED, ids=_ids(STORED))
def test_non_ct_object_is_stored_without_a_job(case: bi.Case, node: NodeProcess, spool: Path,
                                               sent: dict[str, list[str]]) -> None:
    [uid] = sent[case.name]
    assert node.jobs(series=uid) == []
    assert len(list((spool / "series" / uid).glob("*.dcm"))) == 1
    assert case.reason in node.log.read_text()


@pytest.mark.integration
def test_node_still_processes_a_good_series_afterwards(node: NodeProcess, sent: dict[str, list[str]],
                                                       raw_sending: None, tmp_path: Path) -> None:
    good = bi.good_series()
    assert c_store(node, _write(tmp_path / "good", [bi.part10(ds) for ds in good])) == [0x0000] * len(good)
    [job] = wait_for(lambda: _finished_jobs(node, str(good[0].SeriesInstanceUID)), 120, "the good series' job")
    assert job["state"] == "done", job["reason"]
    assert node.proc is not None and node.proc.poll() is None, "the same node process served the whole corpus"
