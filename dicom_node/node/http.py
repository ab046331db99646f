"""The HTTP side: STOW-RS in, and what an operator looks at (health, jobs, metrics).

STOW-RS (PS3.18 §10.5) takes multipart/related; type="application/dicom" and answers
with the Referenced and Failed SOP Sequences in DICOM JSON: 200 when all were stored,
202 when some failed, 409 when none could be stored (a Warning header says why, part by
part), 400 when the body is not well-formed multipart (nothing is stored).
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
from .security import BearerAuth

log = logging.getLogger("dicom_node.node.http")

DICOM_JSON = "application/dicom+json"
# Failure Reason (0008,1197) for an instance whose study differs from the URL's (as dcm4chee answers);
# the others are the DIMSE statuses Intake returns (0xA700 out of resources, 0xA900 does not match the SOP
# class, 0xC000 cannot understand, 0x0111 duplicate SOP instance: see docs/bad-input.md).
MISMATCHED_STUDY = 0xC409


class MultipartError(ValueError):
    """A body that is not well-formed multipart: answered 400 as a whole, nothing stored."""


# RFC 2045 parameters: name=token or name="quoted string"; RFC 2046 boundaries are 1-70 characters.
_PARAM = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)\s*(?:;|$)')
# RFC 2046 allows 70 characters, but Orthanc's DICOMweb plugin sends two UUIDs joined by "-" (73):
# accept what real archives send, as long as it is printable ASCII and of sane length.
_BOUNDARY = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,198}[\x21-\x7e]|[\x21-\x7e]")


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type's media type (lower case) and its parameters (names lower case, unquoted)."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest):
        v = m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.setdefault(m.group(1).lower(), v)
    return main.strip().lower(), params


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body (RFC 2046), each with its headers (lower-case names).

    Strict where leniency would lose or invent data: the boundary must be declared, a delimiter
    only counts at the start of a line, every part needs its blank line after the headers, and
    the body must end with the closing delimiter, else it was cut off. Raises MultipartError only.
    """
    boundary = media_type(content_type)[1].get("boundary", "")
    if not boundary:
        raise MultipartError("Content-Type has no boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("the boundary must be 1 to 200 printable ASCII characters")
    dash = b"--" + boundary.encode("ascii")
    delimiter = b"\r\n" + dash
    if body.startswith(dash):
        pos = 0
    else:  # a preamble before the first delimiter is allowed, and ignored
        pos = body.find(delimiter)
        if pos < 0:
            raise MultipartError("no parts found in the body (the boundary never starts a line)")
        pos += 2
    parts: list[tuple[dict[str, str], bytes]] = []
    while True:
        pos += len(dash)
        if body.startswith(b"--", pos):
            break  # the closing delimiter; an epilogue after it is ignored
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise MultipartError("the body ends after a delimiter (truncated: no closing delimiter)")
        if body[pos:eol].strip(b" \t"):
            raise MultipartError("a delimiter is followed by other text on its line")
        end = body.find(delimiter, eol + 2)
        if end < 0:
            raise MultipartError("the body ends inside a part (truncated: no closing delimiter)")
        parts.append(_part(body[eol + 2:end]))
        pos = end + 2
    if not parts:
        raise MultipartError("no parts found in the body")
    return parts


def _part(raw: bytes) -> tuple[dict[str, str], bytes]:
    """One part's header fields and content."""
    if raw.startswith(b"\r\n"):
        return {}, raw[2:]  # no header fields at all
    head, sep, data = raw.partition(b"\r\n\r\n")
    if not sep:
        raise MultipartError("a part has no blank line (CRLF CRLF) between its headers and its content")
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon and name.strip():
            headers[name.strip().lower()] = value.strip()
    return headers, data


def _header_text(text: str) -> str:
    """Printable ASCII without quotes, short: safe inside an HTTP header's quoted string."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:300]


def _item(sop_class: str, sop_uid: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
                            "00081155": {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def create_app(store: JobStore, intake: Intake | None, metrics: Metrics, info: dict[str, Any],
               tokens: list[str] | None = None) -> FastAPI:
    """``info`` is shown on /healthz (AE title, ports, backend, model); with ``tokens``, every other
    path needs one of them (security.BearerAuth), and /healthz shows details only to a token holder."""
    app = FastAPI(title="dicom-node", docs_url=None, redoc_url=None)
    if tokens:
        app.add_middleware(BearerAuth, tokens=tokens, on_refused=lambda why: metrics.http_refused.labels(why).inc())
    started = time.time()

    @app.get("/healthz")
    def healthz(request: Request) -> dict[str, Any]:
        counts = store.counts()  # also proves the database answers
        if getattr(request.state, "authorized", True) is False:  # tokens configured, none given: no spool path etc.
            return {"status": "ok", "uptime_s": round(time.time() - started, 1)}
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
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """Blocking work (parsing, fsync) off the event loop; also a line per failed part, for people."""
        assert intake is not None
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        why: list[str] = []
        for index, (headers, data) in enumerate(parts, 1):
            part_type = media_type(headers.get("content-type", "application/dicom"))[0]
            if part_type != "application/dicom":
                reason = f"part {index}: Content-Type {part_type!r} is not application/dicom"
                intake.refuse(data, "", "", "stow", CANNOT_UNDERSTAND, "cannot_understand", reason)
                failed.append(_item("", "", CANNOT_UNDERSTAND))
                why.append(reason)
                continue
            try:
                ds = pydicom.dcmread(io.BytesIO(data))  # Pixel Data too: Intake checks it against the header
                sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            except Exception as exc:  # noqa: BLE001 - an unreadable part fails alone, the rest go on
                reason = f"part {index}: not a DICOM file ({exc.__class__.__name__})"
                intake.refuse(data, "", "", "stow", CANNOT_UNDERSTAND, "cannot_understand", reason)
                failed.append(_item("", "", CANNOT_UNDERSTAND))
                why.append(reason)
                continue
            if study and str(getattr(ds, "StudyInstanceUID", "")) != study:
                failed.append(_item(sop_class, sop_uid, MISMATCHED_STUDY))
                why.append(f"part {index}: study {getattr(ds, 'StudyInstanceUID', '')} is not {study}")
                continue
            result = intake.accept(data, ds, "stow")
            if result.status == SUCCESS:
                referenced.append(_item(sop_class, sop_uid))
            else:
                failed.append(_item(sop_class, sop_uid, result.status))
                why.append(f"part {index}: {result.reason}")
        return referenced, failed, why

    async def stow(request: Request, study: str | None = None) -> Response:
        if intake is None:
            raise HTTPException(503, "not receiving")
        ctype = request.headers.get("content-type", "")
        mtype, params = media_type(ctype)
        if mtype != "multipart/related":
            raise HTTPException(415, "expected multipart/related; type=\"application/dicom\"")
        part_type = params.get("type", "application/dicom")
        if part_type.strip().lower() != "application/dicom":
            raise HTTPException(415, f"only type=\"application/dicom\" is supported, not {part_type!r}")
        body = await request.body()
        try:
            parts = split_multipart(body, ctype)
        except MultipartError as exc:
            log.warning("STOW-RS refused (400): %s", exc, **ctx())
            raise HTTPException(400, str(exc)) from None
        referenced, failed, why = await run_in_threadpool(store_parts, parts, study)
        answer: dict[str, Any] = {}
        if referenced:
            answer["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if referenced else 409
        log.info("STOW-RS: %d stored, %d failed", len(referenced), len(failed), **ctx())
        # PS3.18 lets a warning header carry the reasons the Failure Reason codes cannot.
        headers = {"Warning": ", ".join(f'299 dicom-node "{_header_text(w)}"' for w in why[:10])} if why else None
        return JSONResponse(answer, status_code=status, media_type=DICOM_JSON, headers=headers)

    @app.post("/dicomweb/studies")
    async def stow_any(request: Request) -> Response:
        return await stow(request)

    @app.post("/dicomweb/studies/{study}")
    async def stow_study(study: str, request: Request) -> Response:
        return await stow(request, study)

    return app
