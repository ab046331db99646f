"""Wire the node together and run it until SIGINT/SIGTERM.

Start order matters: the job database recovers interrupted work before anything new
arrives, the engine is built (and the model checked) before we accept a single
instance, and the HTTP server runs in the main thread so uvicorn handles the signals.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dicom_node.config import Config, ConfigError
from dicom_node.node.completion import CompletionTimer
from dicom_node.node.intake import Intake
from dicom_node.node.jobs import JobStore, open_job_store
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.receive import Receiver
from dicom_node.node.receive_pool import ReceiverPool
from dicom_node.node.spool import Spool
from dicom_node.node.worker import Workers

log = logging.getLogger("dicom_node.node.server")


class Role(StrEnum):
    """What one ``serve`` process does. ``all`` is the single box; on several hosts, receivers take
    DIMSE and STOW-RS into the shared spool and store, and workers claim, process and send. Every
    role serves /healthz, /metrics and the jobs pages from the shared store."""

    ALL = "all"
    RECEIVER = "receiver"
    WORKER = "worker"


@dataclass
class Node:
    """Every running part, so tests can start a node in-process and stop it cleanly (a part the role
    does not run is None)."""

    cfg: Config
    spool: Spool
    store: JobStore
    metrics: Metrics
    intake: Intake | None
    receiver: Receiver | ReceiverPool | None
    completion: CompletionTimer | None
    workers: Workers | None
    info: dict[str, Any]
    stop_event: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.stop_event.set()
        if self.workers is not None:
            self.workers.stop.set()  # the job in hand stops now, not after the listeners' shutdown (up to 0.5 s)
        if self.receiver is not None:
            self.receiver.stop()
        if self.completion is not None:
            self.completion.shutdown()
        if self.workers is not None:
            self.workers.shutdown()
        if self.completion is not None:
            self.completion.join(5)
        self.store.close()


def start(cfg: Config, backend_name: str | None = None, role: Role | str = Role.ALL) -> Node:
    """Build and start everything the role runs except the HTTP server; raises on a bad model, an
    unreachable job store or a busy port."""
    from dicom_node.backends.select import select
    from dicom_node.pipeline.process import engine_id

    role = Role(role)
    working = role in (Role.ALL, Role.WORKER)
    receiving = role in (Role.ALL, Role.RECEIVER)
    spool = Spool(cfg.spool.dir, cfg.spool.min_free_mb, cfg.spool.durability, cfg.spool.quarantine_mb,
                  shared=bool(cfg.jobs.store))
    try:
        store = open_job_store(cfg.jobs.store, spool.db_path)
    except (ConnectionError, ValueError) as exc:
        raise ConfigError(f"jobs.store: {exc}") from None
    if not cfg.jobs.store:
        # One host owns the whole store: what was in hand when it stopped is put back now. A shared
        # store is never swept by one host's restart (the others' work is in it): leases do that.
        for job in store.recover():
            log.info("resuming: %s", job.reason, **ctx(job.id, job.series_uid))
    metrics = Metrics(store)
    wake = threading.Event()
    node = Node(cfg, spool, store, metrics, None, None, None, None, {})
    info: dict[str, Any] = {"role": str(role), "ae_title": cfg.node.ae_title, "http_port": cfg.http.port,
                            "spool": str(spool.root), "destinations": [d.name for d in cfg.destinations],
                            "job_store": "sqlite" if not cfg.jobs.store else "postgresql"}
    if working:
        # Loads the model now, so a bad one fails the start, not the first job; each job's child loads its own.
        backend, why = select(backend_name or cfg.engine.backend, cfg.engine.model, cfg.engine.threads,
                              cfg.engine.batch)
        mid = engine_id(cfg)
        log.info("backend: %s; model %s", why, mid, **ctx())
        info.update(backend=why, model=mid)
        node.workers = Workers(cfg, spool, store, metrics, backend.name, mid, wake)
        store.listen(wake.set, node.stop_event)  # other hosts' receivers wake these workers (PostgreSQL)
    if receiving:
        node.intake = Intake(spool, store, metrics, cfg.intake)
        node.completion = CompletionTimer(cfg, spool, store, metrics, wake)
        node.intake.on_released = node.completion.released
        if cfg.node.receiver_processes > 1:
            node.receiver = ReceiverPool(cfg, node.intake, metrics, cfg.node.receiver_processes)
        else:
            node.receiver = Receiver(cfg.node, node.intake, metrics)
        node.receiver.start()
        info["dicom_port"] = cfg.node.port
        info["receiver_processes"] = cfg.node.receiver_processes
    if node.workers is not None and node.completion is not None and cfg.jobs.prepare_ahead:
        node.completion.on_hint = node.workers.prepare  # a released series is prepared during its grace
    if node.workers is not None:
        node.workers.start()
    if node.completion is not None:
        node.completion.start()
    node.info = info
    log.info("role %s: %s", role, ", ".join(p for p, on in (("receiving", receiving), ("working", working)) if on),
             **ctx())
    return node


def serve(cfg: Config, backend_name: str | None = None, role: Role | str = Role.ALL) -> int:
    """Run the node in the foreground; returns the exit code."""
    import uvicorn

    from dicom_node.node.http import create_app, header_deadline_protocol
    from dicom_node.node.pages import check_viewer_template
    from dicom_node.node.security import check_http, http_tokens

    check_viewer_template(cfg.viewer.url_template)  # a bad template stops the start, not every job link
    tokens = http_tokens(cfg.http)  # before anything listens: an open network-facing HTTP server is refused
    for warning in check_http(cfg.http, tokens):
        log.warning("%s", warning, **ctx())
    node = start(cfg, backend_name, role)
    try:
        app = create_app(node.store, node.intake, node.metrics, node.info, tokens, cfg.http,
                         pictures=node.spool.pictures_root, viewer_url_template=cfg.viewer.url_template)
        scheme = "https" if cfg.http.cert else "http"
        log.info("HTTP on %s://%s:%d (jobs page /, STOW-RS /dicomweb/studies); %s", scheme, cfg.http.host,
                 cfg.http.port, f"bearer token required except on /healthz ({len(tokens)} configured)" if tokens
                 else "no authentication", **ctx())
        tls = {"ssl_certfile": cfg.http.cert, "ssl_keyfile": cfg.http.key} if cfg.http.cert else {}
        timed_out = node.metrics.connections_refused.labels("http", "header_timeout")
        protocol = header_deadline_protocol(cfg.http.header_seconds, lambda _client: timed_out.inc())
        server = uvicorn.Server(uvicorn.Config(app, host=cfg.http.host, port=cfg.http.port, log_config=None,
                                               access_log=False, http=protocol,
                                               limit_concurrency=cfg.http.max_connections, **tls))
        with _SignalsEndRun():
            server.run()
    finally:
        log.info("shutting down", **ctx())
        node.stop()
    return 0


class _SignalsEndRun:
    """While uvicorn runs, SIGTERM and SIGINT end ``server.run()`` by returning, so that the node then
    stops in order (workers hand their job back, warm children go, the store closes).

    uvicorn catches both signals itself, shuts the HTTP server down, puts back the handlers it found
    and raises the signal again, expecting the default action. For SIGTERM that action kills the
    process on the spot, and ``serve``'s ``finally`` never ran: a stop by systemd or ``docker stop``
    left the job in hand and the children's files to the next start. The handlers in place during
    ``run`` only note the signal; after it they are the old ones again.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> None:
        self.caught: list[int] = []
        self.old = {sig: signal.signal(sig, lambda sig, _frame: self.caught.append(sig)) for sig in self.SIGNALS}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        if self.caught:
            log.info("stopping on signal %s", signal.Signals(self.caught[0]).name, **ctx())
