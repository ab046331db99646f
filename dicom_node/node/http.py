"""The HTTP side: STOW-RS in, and what an operator looks at (health, jobs, metrics).

STOW-RS (PS3.18 §10.5) takes multipart/related; type="application/dicom" and answers
with the Referenced and Failed SOP Sequences in DICOM JSON: 200 when all were stored,
202 when some failed, 409 when none could be stored.
"""

from __future__ import annotations

import html
import io
import logging
import re
import time
from typing import Any

import pydicom
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .assemble import CANNOT_UNDERSTAND, SUCCESS, Intake
from .jobs import STATES, JobStore
from .logs import ctx
from .metrics import Metrics

log = logging.getLogger("dicom_node.node.http")

DICOM_JSON = "application/dicom+json"
# Failure Reason (0008,1197) for an instance whose study differs from the URL's (as dcm4chee answers);
# the others are the DIMSE statuses Intake returns (0xA700 out of resources, 0xC000 cannot understand).
MISMATCHED_STUDY = 0xC409


class MultipartError(ValueError):
    pass


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body, each with its headers (lower-case names)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not m:
        raise MultipartError("Content-Type has no boundary")
    delimiter = b"--" + m.group(1).strip().encode("latin-1")
    pieces = body.split(delimiter)
    if len(pieces) < 3:
        raise MultipartError("no parts found in the body")
    parts: list[tuple[dict[str, str], bytes]] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # closing delimiter
        piece = piece[2:] if piece.startswith(b"\r\n") else piece.lstrip(b"\n")
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("a part has no header/body separator")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        parts.append((headers, data))
    return parts


def _item(sop_class: str, sop_uid: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
                            "00081155": {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def create_app(store: JobStore, intake: Intake | None, metrics: Metrics, info: dict[str, Any]) -> FastAPI:
    """``info`` is shown on /healthz (AE title, ports, backend, model)."""
    app = FastAPI(title="dicom-node", docs_url=None, redoc_url=None)
    started = time.time()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        counts = store.counts()  # also proves the database answers
        return {"status": "ok", "uptime_s": round(time.time() - started, 1), "jobs": counts, **info}

    @app.get("/jobs")
    def jobs(state: str | None = None, series: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise HTTPException(400, f"state must be one of {', '.join(STATES)}")
        return [j.as_json() for j in store.list(state, max(1, min(limit, 1000)), series)]

    @app.get("/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        j = store.get(job_id)
        if j is None:
            raise HTTPException(404, f"no job {job_id}")
        return j.as_json()

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        rows = []
        for j in store.list(limit=200):
            d = j.as_json()
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(d[k] if d[k] is not None else ''))}</td>" for k in
                                         ("id", "state", "description", "instances", "received_at", "finished_at",
                                          "reason")) + "</tr>")
        counts = " · ".join(f"{k}: {v}" for k, v in store.counts().items())
        return ("<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='5'>"
                "<title>dicom-node jobs</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
                "border-bottom:1px solid #ddd;text-align:left;vertical-align:top}</style></head><body>"
                f"<h1>dicom-node</h1><p>{html.escape(str(info.get('ae_title', '')))} · {html.escape(counts)}</p>"
                "<table><tr><th>job</th><th>state</th><th>series</th><th>instances</th><th>received</th>"
                f"<th>finished</th><th>reason</th></tr>{''.join(rows)}</table></body></html>")

    def store_parts(parts: list[tuple[dict[str, str], bytes]], study: str | None,
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Blocking work (parsing, fsync) off the event loop."""
        assert intake is not None
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for _headers, data in parts:
            try:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            except Exception:  # noqa: BLE001 - an unreadable part fails alone, the rest go on
                metrics.rejected.labels("stow", "cannot_understand").inc()
                failed.append(_item("", "", CANNOT_UNDERSTAND))
                continue
            if study and str(getattr(ds, "StudyInstanceUID", "")) != study:
                failed.append(_item(sop_class, sop_uid, MISMATCHED_STUDY))
                continue
            result = intake.accept(data, ds, "stow")
            if result.status == SUCCESS:
                referenced.append(_item(sop_class, sop_uid))
            else:
                failed.append(_item(sop_class, sop_uid, result.status))
        return referenced, failed

    async def stow(request: Request, study: str | None = None) -> Response:
        if intake is None:
            raise HTTPException(503, "not receiving")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/related"):
            raise HTTPException(415, "expected multipart/related; type=\"application/dicom\"")
        m = re.search(r'type="?([^";]+)"?', ctype, re.IGNORECASE)
        if m and m.group(1).strip().lower() != "application/dicom":
            raise HTTPException(415, f"only type=\"application/dicom\" is supported, not {m.group(1)!r}")
        body = await request.body()
        try:
            parts = split_multipart(body, ctype)
        except MultipartError as exc:
            raise HTTPException(400, str(exc)) from None
        referenced, failed = await run_in_threadpool(store_parts, parts, study)
        answer: dict[str, Any] = {}
        if referenced:
            answer["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if referenced else 409
        log.info("STOW-RS: %d stored, %d failed", len(referenced), len(failed), **ctx())
        return JSONResponse(answer, status_code=status, media_type=DICOM_JSON)

    @app.post("/dicomweb/studies")
    async def stow_any(request: Request) -> Response:
        return await stow(request)

    @app.post("/dicomweb/studies/{study}")
    async def stow_study(study: str, request: Request) -> Response:
        return await stow(request, study)

    return app
