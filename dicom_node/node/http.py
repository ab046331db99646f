"""The HTTP side: STOW-RS in, and what an operator looks at (health, jobs, metrics).

STOW-RS (PS3.18 §10.5) takes multipart/related; type="application/dicom" and answers
with the Referenced and Failed SOP Sequences in DICOM JSON: 200 when all were stored,
202 when some failed, 409 when none could be stored (a Warning header says why, part by
part), 400 when the body is not well-formed multipart (nothing is stored).

A body is never held in memory: it streams to a file in the spool's ``tmp/`` (refused
with 413 past ``http.max_body_mb``, before a byte is read when Content-Length says so),
its delimiters are found as it streams past, and its parts are read back and stored one at a time
(at most ``http.max_parts``); the parsing is ``stow.py``'s. A client that never finishes its request headers is
dropped after ``http.header_seconds``; connections beyond ``http.max_connections`` get 503.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicom_node.config import HttpConfig
from dicom_node.node.intake import CANNOT_UNDERSTAND, JOB_STORE_FAILED, OUT_OF_RESOURCES, SUCCESS, Intake
from dicom_node.node.jobs import STATES, JobStore
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.pages import PICTURE_NAME, job_page, list_page, viewer_url, wants_html
from dicom_node.node.security import BearerAuth
from dicom_node.node.stow import (
    BodyFile,
    BodyTooLargeError,
    DelimiterScanner,
    MultipartError,
    dash_boundary,
    media_type,
    multipart_spans,
)

log = logging.getLogger("dicom_node.node.http")

DICOM_JSON = "application/dicom+json"
LOGGED_REFUSALS = 10  # refused parts logged one by one per request; the rest are counted and summed up
# Failure Reason (0008,1197) for an instance whose study differs from the URL's (as dcm4chee answers);
# the others are the DIMSE statuses Intake returns (0xA700 out of resources, 0xA900 does not match the SOP
# class, 0xC000 cannot understand, 0x0111 duplicate SOP instance: see docs/bad-input.md).
MISMATCHED_STUDY = 0xC409


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is not complete in time.

    uvicorn times out idle keep-alive connections, but not a client that sends half a request line and
    then nothing: a handful of those would hold the server's connection slots for good. The deadline runs
    from the connection's start, and again from the first byte of each later request on it.
    """

    header_seconds = 10.0
    on_timeout: Callable[[str], None] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._armed_cycle = self.cycle
        self._head_deadline = self.loop.call_later(self.header_seconds, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of another request on a kept-alive connection
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._armed_cycle:  # a request head arrived whole: a new cycle began
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        self._head_deadline = None
        if self.cycle is self._armed_cycle and not self.transport.is_closing():
            client = self.client[0] if self.client else "?"
            log.warning("HTTP connection from %s dropped: no complete request head within %g s", client,
                        self.header_seconds, **ctx(peer=client))
            if self.on_timeout is not None:
                self.on_timeout(client)
            self.transport.close()


def header_deadline_protocol(seconds: float, on_timeout: Callable[[str], None] | None) -> type[H11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with the node's deadline and metric hook."""
    return type("NodeH11Protocol", (HeaderDeadlineProtocol,), {"header_seconds": seconds,
                                                                "on_timeout": staticmethod(on_timeout)
                                                                if on_timeout else None})


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
               tokens: list[str] | None = None, limits: HttpConfig | None = None, pictures: Path | None = None,
               viewer_url_template: str = "") -> FastAPI:
    """``info`` is shown on /healthz (AE title, ports, backend, model); with ``tokens``, every other
    path needs one of them (security.BearerAuth), and /healthz shows details only to a token holder.
    ``limits`` gives the body and part limits (http.max_body_mb, http.max_parts). ``pictures`` is the
    spool's pictures folder (``<job id>/lesion-N.png``); ``viewer_url_template`` (viewer.url_template)
    makes each job's link to the study in the site's viewer."""
    limits = limits or HttpConfig()
    max_body = limits.max_body_mb << 20
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

    def shown(j: Any) -> dict[str, Any]:
        """A job as the API shows it, with its pictures and its link to the viewer."""
        d = j.as_json()
        d["pictures"] = [{"lesion": r["lesion"], "file": r["picture"]} for r in j.lesions if r.get("picture")]
        d["viewer_url"] = viewer_url(viewer_url_template, j) if viewer_url_template else None
        return d

    @app.get("/jobs")
    def jobs(state: str | None = None, series: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise HTTPException(400, f"state must be one of {', '.join(STATES)}")
        return [shown(j) for j in store.list(state, max(1, min(limit, 1000)), series)]

    @app.get("/jobs/{job_id}", response_model=None)
    def job(job_id: int, request: Request) -> dict[str, Any] | HTMLResponse:
        if wants_html(request.headers.get("accept", "")):  # a browser: the page, which reads the JSON itself
            return HTMLResponse(job_page(job_id))
        j = store.get(job_id)  # an id beyond SQLite's range is simply no job (404), never a 500
        if j is None:
            raise HTTPException(404, f"no job {job_id}")
        return {**shown(j), "sends": store.ledger(job_id)}

    @app.get("/jobs/{job_id}/pictures/{name}")
    def job_picture(job_id: int, name: str) -> Response:
        if pictures is None or not PICTURE_NAME.match(name):
            raise HTTPException(404, f"no picture {name!r}")
        path = pictures / str(job_id) / name
        if not path.is_file():
            raise HTTPException(404, f"job {job_id} has no picture {name}")
        # made once when the job was processed, never changed: the browser may keep it
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return list_page(str(info.get("ae_title", "")))

    def store_parts(body: Path, scanner: DelimiterScanner, ctype: str, study: str | None, jobs: set[int],
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """Blocking work (parsing, fsync) off the event loop; also a line per failed part, for people.

        Only the part in hand is read into memory. Raises MultipartError (400) before anything is
        stored, and BodyTooLargeError (413) for more than http.max_parts parts."""
        with body.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise MultipartError("the body is empty")
            view = BodyFile(f.fileno(), size, scanner)
            spans = multipart_spans(view, ctype)
            if len(spans) > limits.max_parts:
                raise BodyTooLargeError(f"{len(spans)} parts, more than http.max_parts = {limits.max_parts}")
            return _store_spans(view, spans, study, jobs)

    def _store_spans(body: BodyFile, spans: list[tuple[dict[str, str], int, int]], study: str | None,
                     jobs: set[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """Store each part; ``jobs`` collects the jobs its instances went into (the request's completion hint)."""
        assert intake is not None
        referenced: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        why: list[str] = []
        for index, (headers, start, end) in enumerate(spans, 1):
            data = body[start:end]
            loud = len(why) < LOGGED_REFUSALS  # a flood of junk parts gets a summary, not a line each
            part_type = media_type(headers.get("content-type", "application/dicom"))[0]
            if part_type != "application/dicom":
                reason = f"part {index}: Content-Type {part_type!r} is not application/dicom"
                intake.refuse(data, "", "", "stow", CANNOT_UNDERSTAND, "cannot_understand", reason, loud=loud)
                failed.append(_item("", "", CANNOT_UNDERSTAND))
                why.append(reason)
                continue
            try:
                ds = pydicom.dcmread(io.BytesIO(data))  # Pixel Data too: Intake checks it against the header
                sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            except Exception as exc:  # noqa: BLE001 - an unreadable part fails alone, the rest go on
                reason = f"part {index}: not a DICOM file ({exc.__class__.__name__})"
                intake.refuse(data, "", "", "stow", CANNOT_UNDERSTAND, "cannot_understand", reason, loud=loud)
                failed.append(_item("", "", CANNOT_UNDERSTAND))
                why.append(reason)
                continue
            if study and str(getattr(ds, "StudyInstanceUID", "")) != study:
                failed.append(_item(sop_class, sop_uid, MISMATCHED_STUDY))
                why.append(f"part {index}: study {getattr(ds, 'StudyInstanceUID', '')} is not {study}")
                continue
            result = intake.accept(data, ds, "stow", loud=loud)
            if result.status == SUCCESS:
                referenced.append(_item(sop_class, sop_uid))
                if result.job_id is not None:
                    jobs.add(result.job_id)
            else:
                failed.append(_item(sop_class, sop_uid, result.status))
                why.append(f"part {index}: {result.reason}")
        if len(why) > LOGGED_REFUSALS:
            log.warning("STOW-RS: %d parts refused; the first %d were logged, the rest only counted", len(why),
                        LOGGED_REFUSALS, **ctx())
        return referenced, failed, why

    async def receive_body(request: Request) -> tuple[Path | None, DelimiterScanner]:
        """Stream the body into the spool's tmp/, finding its delimiters on the way; the path is None when
        the spool could not take it (a full disk): the scanner still tells how many parts it held."""
        assert intake is not None
        scanner = DelimiterScanner(dash_boundary(request.headers.get("content-type", "")), limits.max_parts)
        path = intake.spool.tmp_path(f"stow-{uuid.uuid4().hex}.body")
        size = 0
        try:
            intake.spool.check_space()
            f = path.open("wb")
        except OSError:
            f = None
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise BodyTooLargeError(f"the body passed http.max_body_mb = {limits.max_body_mb} MB")
                scanner.feed(chunk)
                if f is not None:
                    try:
                        f.write(chunk)
                    except OSError:  # the disk filled up under us: keep nothing, count the rest
                        f.close()
                        f = None
                        path.unlink(missing_ok=True)
        except BaseException:
            if f is not None:
                f.close()
            path.unlink(missing_ok=True)
            raise
        if f is not None:
            try:
                f.close()  # buffered bytes hit the disk here: it may be full now
                return path, scanner
            except OSError:
                path.unlink(missing_ok=True)
        return None, scanner

    async def stow(request: Request, study: str | None = None) -> Response:
        """One STOW-RS request, counted in flight from its first byte to its answer (see StowRequests)."""
        if intake is None:
            raise HTTPException(503, "not receiving")
        jobs: set[int] = set()
        clean = False
        intake.stow.begin()
        try:
            response = await _stow(request, study, jobs)
            clean = response.status_code == 200
            return response
        finally:
            intake.stow.end(jobs, clean)

    async def _stow(request: Request, study: str | None, jobs: set[int]) -> Response:
        assert intake is not None
        ctype = request.headers.get("content-type", "")
        mtype, params = media_type(ctype)
        if mtype != "multipart/related":
            raise HTTPException(415, "expected multipart/related; type=\"application/dicom\"")
        part_type = params.get("type", "application/dicom")
        if part_type.strip().lower() != "application/dicom":
            raise HTTPException(415, f"only type=\"application/dicom\" is supported, not {part_type!r}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return _too_large(f"Content-Length {declared} is more than http.max_body_mb = {limits.max_body_mb} MB")
        try:
            body, scanner = await receive_body(request)
        except MultipartError as exc:
            log.warning("STOW-RS refused (400): %s", exc, **ctx())
            raise HTTPException(400, str(exc)) from None
        except BodyTooLargeError as exc:
            return _too_large(str(exc))
        if body is None:  # the spool is full: every part gets "out of resources", as C-STORE answers
            lost_parts = scanner.parts
            reason = "spool full: below its free-space floor or out of space"
            metrics.rejected.labels("stow", "out_of_resources").inc(lost_parts)
            log.error("STOW-RS: %d parts refused, %s", lost_parts, reason, **ctx())
            answer = {"00081198": {"vr": "SQ", "Value": [_item("", "", OUT_OF_RESOURCES)] * lost_parts}}
            return JSONResponse(answer, status_code=409, media_type=DICOM_JSON,
                                headers={"Warning": f'299 dicom-node "{reason}"'})
        try:
            referenced, failed, why = await run_in_threadpool(store_parts, body, scanner, ctype, study, jobs)
        except MultipartError as exc:
            log.warning("STOW-RS refused (400): %s", exc, **ctx())
            raise HTTPException(400, str(exc)) from None
        except BodyTooLargeError as exc:
            return _too_large(str(exc))
        finally:
            body.unlink(missing_ok=True)
        answer: dict[str, Any] = {}
        if referenced:
            answer["00081199"] = {"vr": "SQ", "Value": referenced}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if referenced else 409
        if failed and not referenced and all(JOB_STORE_FAILED in w for w in why):
            # Nothing could be recorded because the job store is away: the server's trouble, not the
            # request's; the client should come back (as a C-STORE sender retries "out of resources").
            log.warning("STOW-RS refused (503): the job store is unavailable", **ctx())
            return JSONResponse(answer, status_code=503, media_type=DICOM_JSON,
                                headers={"Retry-After": "10", "Warning": '299 dicom-node "job store unavailable"'})
        log.info("STOW-RS: %d stored, %d failed", len(referenced), len(failed), **ctx())
        # PS3.18 lets a warning header carry the reasons the Failure Reason codes cannot.
        headers = {"Warning": ", ".join(f'299 dicom-node "{_header_text(w)}"' for w in why[:10])} if why else None
        return JSONResponse(answer, status_code=status, media_type=DICOM_JSON, headers=headers)

    def _too_large(why: str) -> Response:
        metrics.http_limited.labels("body_too_large").inc()
        log.warning("STOW-RS refused (413): %s", why, **ctx())
        # The rest of an unread body is not worth reading: the connection closes after the answer.
        return JSONResponse({"detail": why}, status_code=413, headers={"Connection": "close"})

    @app.post("/dicomweb/studies")
    async def stow_any(request: Request) -> Response:
        return await stow(request)

    @app.post("/dicomweb/studies/{study}")
    async def stow_study(study: str, request: Request) -> Response:
        return await stow(request, study)

    return app
