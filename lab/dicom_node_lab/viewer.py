"""OHIF in front of a real Orthanc, on one origin: what the radiologist opens, for the tests and the demo.

OHIF v3 ships ready-built in the npm package ``@ohif/app`` (its ``dist/``; ``make ohif``
unpacks it under ``.cache/``). Orthanc sends no CORS headers, so the browser must load
OHIF and Orthanc's DICOMweb from the same origin: :func:`create_site` serves OHIF's files
with our ``app-config.js`` and passes ``/dicom-web/`` through to Orthanc. It runs in a
thread of the calling process (:class:`ViewerSite`) on a private loopback port.

``python -m dicom_node_lab.viewer`` (``make viewer``) brings up Orthanc, the node and
this site with the demo study routed through the node, and prints the viewer's URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from dicom_node_lab.peers import REPO, PeerError, free_port, wait_for

OHIF_VERSION = "3.13.2"  # the npm package @ohif/app that `make ohif` unpacks
OHIF_DIST_ENV = "DICOM_NODE_OHIF_DIST"
# Response headers that belong to one connection and are not copied through (the body passes raw,
# so Content-Encoding and Content-Length stay as Orthanc sent them).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "server"}


def ohif_dist() -> Path:
    """Where OHIF's built files are: $DICOM_NODE_OHIF_DIST, or what ``make ohif`` unpacked."""
    path = Path(os.environ.get(OHIF_DIST_ENV, REPO / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"))
    if not (path / "index.html").is_file():
        raise PeerError(f"OHIF's built viewer is not at {path}: run `make ohif` (npm pack @ohif/app@{OHIF_VERSION})")
    return path


def app_config(title: str = "dicom-node") -> str:
    """OHIF's ``window.config`` for Orthanc's DICOMweb on the same origin.

    WADO-RS rendering (Orthanc's plugin has no /rendered for every object), bulk data
    resolved against the study, no study list filters that Orthanc cannot answer (fuzzy
    matching), and no confirmation prompts: a SEG loads onto its image when asked,
    without a dialog a test (or a busy radiologist) would have to click away.
    """
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": False,
        "disableConfirmationPrompts": True,
        "measurementTrackingMode": "none",
        "defaultDataSourceName": "orthanc",
        "whiteLabeling": {},
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "orthanc",
            "configuration": {
                "friendlyName": f"{title} (Orthanc DICOMweb)", "name": "orthanc",
                "wadoUriRoot": "/dicom-web", "qidoRoot": "/dicom-web", "wadoRoot": "/dicom-web",
                "qidoSupportsIncludeField": False, "imageRendering": "wadors", "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "supportsWildcard": True,
                "dicomUploadEnabled": False, "omitQuotationForMultipartRequest": True,
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            },
        }],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


def create_site(dist: Path, orthanc_url: str, title: str = "dicom-node") -> Starlette:
    """OHIF's files, our app-config.js, and Orthanc's /dicom-web/ behind one origin."""
    client = httpx.AsyncClient(base_url=orthanc_url, timeout=120.0)
    config_js = app_config(title)
    root = dist.resolve()

    async def dicomweb(request: Request) -> Response:
        path = "/dicom-web/" + request.path_params["path"]
        upstream = client.build_request(request.method, path, params=request.query_params,
                                        headers={k: v for k, v in request.headers.items()
                                                 if k.lower() in ("accept", "content-type")},
                                        content=await request.body())
        reply = await client.send(upstream, stream=True)
        headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=headers,
                                 background=None if reply.is_closed else _closer(reply))

    async def config(_: Request) -> Response:
        return Response(config_js, media_type="application/javascript", headers={"Cache-Control": "no-store"})

    async def files(request: Request) -> Response:
        rel = request.path_params.get("path", "")
        path = (root / rel).resolve()
        if rel and path.is_file() and path.is_relative_to(root):
            return FileResponse(path)
        if "." in rel.rsplit("/", 1)[-1]:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(root / "index.html")  # OHIF's own routes (/viewer, ...) are the single page app

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        yield
        await client.aclose()

    return Starlette(routes=[
        Route("/app-config.js", config),
        Route("/dicom-web/{path:path}", dicomweb, methods=["GET", "POST"]),
        Route("/{path:path}", files),
    ], lifespan=lifespan)


def _closer(reply: httpx.Response):
    from starlette.background import BackgroundTask

    return BackgroundTask(reply.aclose)


class ViewerSite:
    """:func:`create_site` served by uvicorn in a daemon thread on 127.0.0.1."""

    def __init__(self, orthanc_url: str, dist: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        app = create_site(dist or ohif_dist(), orthanc_url)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="ohif-site")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def viewer_url(self, study_uid: str, grid: bool = True) -> str:
        """The study in OHIF's basic viewer; ``grid`` hangs every series side by side (``@ohif/mnGrid``)."""
        hp = "&hangingProtocolId=@ohif/mnGrid" if grid else ""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}{hp}"

    def start(self) -> ViewerSite:
        self.thread.start()
        wait_for(lambda: self.server.started, 20, "the OHIF site")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orthanc", help="an Orthanc already running (its HTTP URL); default: start the demo")
    ap.add_argument("--port", type=int, default=8090, help="the OHIF site's port on 127.0.0.1")
    args = ap.parse_args(argv)
    if args.orthanc:
        site = ViewerSite(args.orthanc, port=args.port).start()
        print(f"OHIF on {site.url}, DICOMweb from {args.orthanc}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            site.stop()
        return 0
    from dicom_node_lab.demo_viewer import run_demo

    return run_demo(args.port)


if __name__ == "__main__":
    raise SystemExit(main())
