"""Several receiver processes behind one DICOM listener (``node.receiver_processes``).

Why: the node's C-STORE intake is CPU-bound in one Python process. pynetdicom's PDU decoding and
state machine hold the GIL for most of an instance, so four associations into one process are
no faster than one (README, "Why ingest stays below Orthanc"). Child processes each run their own
pynetdicom server; only this module's parent listens.

Why one listener and not ``SO_REUSEPORT``: the kernel spreads connections over reuse-port sockets
by a hash of the addresses, not by load (tried: two of four associations often land on one
process), and each process would count the connection limits alone. Here the parent accepts,
checks ``node.max_connections`` and ``max_connections_per_host`` for the whole node, and hands the
socket (``SCM_RIGHTS`` over a ``SOCK_SEQPACKET`` pair) to the child with the fewest open
connections. The child runs it exactly as a one-process node would: allowlist, TLS handshake,
limits on PDUs and silence, checks on arrival, the durable spool write before success.

What only the parent can know is told to it over the same pair, as JSON messages:
- the job store is shared already (SQLite in WAL mode, or PostgreSQL): instances are counted
  into their jobs by the child that received them;
- a released association is a completion hint; the parent forwards it to completion only when no
  association in any child is still sending that series (each child reports the first and the
  last of its own senders per job), so a series sent over two associations that landed in two
  children is not cut in two;
- counters (instances, refusals, aborted associations) are summed into the parent's /metrics.

A child that dies takes only its own open associations with it (their senders see the connection
drop, and nothing unacknowledged was acknowledged); the parent starts a new one. STOW-RS stays in
the parent's HTTP server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_node.config import Config
from dicom_node.node.intake import Intake
from dicom_node.node.logs import ctx
from dicom_node.node.metrics import Metrics
from dicom_node.node.receive import ConnectionLimits, listening_mode, refuse_connection

log = logging.getLogger("dicom_node.node.receive_pool")

READY_SECONDS = 60.0  # a child that has not said "ready" by then fails the start
RESTART_SECONDS = 1.0  # pause before a dead child is replaced
FLUSH_SECONDS = 0.25  # how often a child sends its counters
MESSAGE_BYTES = 1 << 16  # the longest message on a pair (a SEQPACKET message is read whole)
# The counters a child may add to (Metrics attributes); anything else in a message is ignored.
RELAYED_COUNTERS = frozenset({"instances", "rejected", "connections_refused", "associations_rejected",
                              "aborted_associations"})


@dataclass
class _Child:
    """One receiver process, as the parent sees it."""

    index: int
    proc: subprocess.Popen | None = None
    chan: socket.socket | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    open_by_host: dict[str, int] = field(default_factory=dict)  # connections handed and not yet closed
    handed: int = 0  # connections handed since the node started (ties go to the child with fewer)
    sending: set[int] = field(default_factory=set)  # jobs some association of this child is sending
    ready: threading.Event = field(default_factory=threading.Event)

    def open(self) -> int:
        return sum(self.open_by_host.values())


class ReceiverPool:
    """The parent: one listener (two with ``node.tls.keep_plain``), ``processes`` children, and the
    bookkeeping that spans them. Same surface as ``Receiver``: ``start`` and ``stop``."""

    def __init__(self, cfg: Config, intake: Intake, metrics: Metrics, processes: int) -> None:
        if processes < 2:
            raise ValueError(f"a receiver pool needs at least 2 processes, not {processes}")
        self.cfg = cfg
        self.intake = intake
        self.metrics = metrics
        self.limits = ConnectionLimits(cfg.node.max_connections, cfg.node.max_connections_per_host)
        self.children = [_Child(i) for i in range(processes)]
        self._lock = threading.Lock()  # children's open counts and senders
        self._stopping = threading.Event()
        self._listeners: list[tuple[socket.socket, bool]] = []  # (socket, accepts TLS)

    # ---- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the children, wait until each is ready, then listen; raises if a child cannot start
        or the port is taken (as a one-process node does)."""
        for child in self.children:
            self._spawn(child)
        deadline = time.monotonic() + READY_SECONDS
        for child in self.children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"receiver process {child.index} did not start within {READY_SECONDS:g} s "
                                   "(its errors are in the log above)")
        node = self.cfg.node
        ports = [(node.tls.port, True)] if node.tls.enabled else [(node.port, False)]
        if node.tls.enabled and node.tls.keep_plain:
            ports.append((node.port, False))
        try:
            for port, tls in ports:
                self._listeners.append((_listen(node.host, port), tls))
        except OSError:
            self.stop()
            raise
        for sock, tls in self._listeners:
            threading.Thread(target=self._accept_loop, args=(sock, tls), name="dimse-pool-acceptor",
                             daemon=True).start()
            log.info("DICOM listening on %s:%d as %s%s, %d receiver processes", node.host, sock.getsockname()[1],
                     node.ae_title, listening_mode(node.tls, tls), len(self.children), **ctx())

    def stop(self) -> None:
        """Stop listening, then ask every child to stop; one that does not within 5 s is killed."""
        self._stopping.set()
        for sock, _tls in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
            sock.close()
        self._listeners = []
        for child in self.children:
            self._send(child, {"stop": True})
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
            if child.chan is not None:
                child.chan.close()

    def _spawn(self, child: _Child) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child.ready.clear()
        child.chan = parent_end
        child.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.node.receive_pool", str(child_end.fileno())],
                                      stdin=subprocess.PIPE, pass_fds=(child_end.fileno(),))
        child_end.close()
        assert child.proc.stdin is not None
        child.proc.stdin.write(pickle.dumps({"cfg": self.cfg, "index": child.index,
                                             "log_level": logging.getLogger().level}))
        child.proc.stdin.close()
        threading.Thread(target=self._read_loop, args=(child, parent_end), name=f"dimse-pool-{child.index}",
                         daemon=True).start()

    # ---- connections -------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, tls: bool) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.warning("accept failed", exc_info=True, **ctx())
                time.sleep(0.1)
                continue
            try:
                self._hand(conn, address, tls)
            finally:
                conn.close()  # the child holds its own copy now, or the connection was refused

    def _hand(self, conn: socket.socket, address: Any, tls: bool) -> None:
        host = str(address[0])
        why = self.limits.admit(host)
        if why is not None:
            refuse_connection(host, why, lambda label: self.metrics.connections_refused.labels("dimse", label).inc())
            return
        message = {"address": [host, int(address[1])], "tls": tls}
        with self._lock:
            order = sorted((c for c in self.children if c.ready.is_set()), key=lambda c: (c.open(), c.handed))
        for child in order:
            with self._lock:
                child.open_by_host[host] = child.open_by_host.get(host, 0) + 1
                child.handed += 1
            if self._send(child, message, conn.fileno()):
                self.metrics.connections_handed.labels(str(child.index)).inc()
                return
            with self._lock:
                _drop(child.open_by_host, host)
        self.limits.release(host)
        log.error("connection from %s dropped: no receiver process is running", host, **ctx(peer=host))

    def _send(self, child: _Child, payload: dict, fd: int | None = None) -> bool:
        """One message to a child (with a connection's descriptor, if ``fd``); False if it cannot take it."""
        data = json.dumps(payload).encode()
        with child.send_lock:
            if child.chan is None:
                return False
            try:
                if fd is None:
                    child.chan.send(data)
                else:
                    socket.send_fds(child.chan, [data], [fd])
                return True
            except OSError:
                return False

    # ---- what the children say ---------------------------------------------------------------

    def _read_loop(self, child: _Child, chan: socket.socket) -> None:
        while True:
            try:
                data = chan.recv(MESSAGE_BYTES)
            except OSError:
                data = b""
            if not data:
                break
            try:
                self._on_message(child, json.loads(data))
            except Exception:  # noqa: BLE001 - one bad message must not end the parent's view of a child
                log.exception("receiver process %d: message not understood", child.index, **ctx())
        self._on_exit(child, chan)

    def _on_message(self, child: _Child, msg: dict[str, Any]) -> None:
        if "ready" in msg:
            child.ready.set()
        if "closed" in msg:
            host = str(msg["closed"])
            with self._lock:
                known = _drop(child.open_by_host, host)
            if known:
                self.limits.release(host)
        if "senders" in msg:
            job_id, sending = int(msg["senders"][0]), bool(msg["senders"][1])
            with self._lock:
                (child.sending.add if sending else child.sending.discard)(job_id)
        if "released" in msg:
            ids, at, why = msg["released"]
            with self._lock:
                done = [int(j) for j in ids if not any(int(j) in c.sending for c in self.children)]
            self.intake.released(done, str(why), float(at))
        for name, labels, amount in msg.get("metrics", []):
            if name in RELAYED_COUNTERS:
                counter = getattr(self.metrics, name)
                (counter.labels(*labels) if labels else counter).inc(amount)

    def _on_exit(self, child: _Child, chan: socket.socket) -> None:
        """The pair closed: the child ended. Its connections are gone with it; unless the node is
        stopping, a new child takes its place."""
        code = child.proc.wait() if child.proc is not None else None
        with self._lock:
            hosts = dict(child.open_by_host)
            child.open_by_host.clear()
            child.sending.clear()
            if child.chan is chan:
                child.chan = None
        for host, n in hosts.items():
            for _ in range(n):
                self.limits.release(host)
        chan.close()
        if self._stopping.is_set():
            return
        log.error("receiver process %d ended (exit code %s) with %d connections open; starting another",
                  child.index, code, sum(hosts.values()), **ctx())
        self.metrics.receiver_restarts.inc()
        while not self._stopping.wait(RESTART_SECONDS):
            try:
                self._spawn(child)
                return
            except OSError:  # out of processes or memory for the moment: the others serve meanwhile
                log.exception("receiver process %d could not be started; trying again", child.index, **ctx())


def _drop(counts: dict[str, int], host: str) -> bool:
    """One connection from ``host`` fewer; False when none was counted."""
    n = counts.get(host, 0)
    if n <= 0:
        return False
    if n == 1:
        del counts[host]
    else:
        counts[host] = n - 1
    return True


def _listen(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=64)


# ---- the child ---------------------------------------------------------------------------------


class _Relay:
    """The child's side of the pair: counters summed and sent every ``FLUSH_SECONDS``; senders, closed
    connections and release hints sent at once, in the order they happen."""

    def __init__(self, chan: socket.socket) -> None:
        self.chan = chan
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, tuple[str, ...]], float] = defaultdict(float)
        self.metrics = _RelayedMetrics(self._count)

    def send(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        with self._lock:
            self.chan.send(data)

    def _count(self, name: str, labels: tuple[str, ...], amount: float) -> None:
        with self._lock:
            self._counts[(name, labels)] += amount

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, defaultdict(float)
            if counts:
                self.chan.send(json.dumps({"metrics": [[n, list(lb), a] for (n, lb), a in counts.items()]}).encode())

    def flush_forever(self, stop: threading.Event) -> None:
        while not stop.wait(FLUSH_SECONDS):
            try:
                self.flush()
            except OSError:
                return

    def senders(self, job_id: int, sending: bool) -> None:
        self.send({"senders": [job_id, sending]})

    def closed(self, host: str) -> None:
        self.flush()  # the counters of a finished association arrive before the next one is counted
        self.send({"closed": host})

    def released(self, job_ids: list[int], at: float, why: str) -> None:
        self.send({"released": [job_ids, at, why]})


class _RelayedCounter:
    """Stands in for a prometheus Counter (``labels(...).inc(n)`` or ``inc(n)``) in a child."""

    def __init__(self, name: str, count: Callable[[str, tuple[str, ...], float], None],
                 labels: tuple[str, ...] = ()) -> None:
        self._name, self._count, self._labels = name, count, labels

    def labels(self, *values: str) -> _RelayedCounter:
        return _RelayedCounter(self._name, self._count, tuple(str(v) for v in values))

    def inc(self, amount: float = 1) -> None:
        self._count(self._name, self._labels, amount)


class _RelayedMetrics:
    """The counters a receiver touches, relayed to the parent's registry."""

    def __init__(self, count: Callable[[str, tuple[str, ...], float], None]) -> None:
        for name in RELAYED_COUNTERS:
            setattr(self, name, _RelayedCounter(name, count))


class _ReceiverTag(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.receiver = self.index
        return True


def _child_main(fd: int) -> int:
    """A receiver process: the node's intake and a pynetdicom server that never listens; runs the
    connections its parent hands over until the parent says stop or goes away."""
    from dicom_node.node import logs
    from dicom_node.node.jobs import open_job_store
    from dicom_node.node.receive import Receiver
    from dicom_node.node.spool import Spool

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us in order
    init = pickle.load(sys.stdin.buffer)
    cfg: Config = init["cfg"]
    index = int(init["index"])
    logs.setup(int(init["log_level"]) or logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ReceiverTag(index))
    chan = socket.socket(fileno=fd)
    relay = _Relay(chan)
    # shared=True: this process must not sweep the parent's (or a sibling's) writes in progress from tmp/
    spool = Spool(cfg.spool.dir, cfg.spool.min_free_mb, cfg.spool.durability, cfg.spool.quarantine_mb, shared=True)
    store = open_job_store(cfg.jobs.store, spool.db_path)
    intake = Intake(spool, store, relay.metrics, cfg.intake)  # type: ignore[arg-type] - the relayed counters
    intake.on_released = relay.released
    receiver = Receiver(cfg.node, intake, relay.metrics, listen=False)  # type: ignore[arg-type]
    receiver.on_job_senders = relay.senders
    receiver.on_closed = relay.closed
    receiver.start()
    stop = threading.Event()
    threading.Thread(target=relay.flush_forever, args=(stop,), name="pool-metrics", daemon=True).start()
    relay.send({"ready": os.getpid()})
    try:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(chan, MESSAGE_BYTES, 4)
            except OSError:
                break
            if not data:
                for extra in fds:
                    os.close(extra)
                break  # the parent is gone
            msg = json.loads(data)
            if msg.get("stop"):
                break
            if not fds:
                continue
            for extra in fds[1:]:
                os.close(extra)
            conn = socket.socket(fileno=fds[0])
            try:
                receiver.adopt(conn, (str(msg["address"][0]), int(msg["address"][1])), bool(msg["tls"]))
            except Exception:  # noqa: BLE001 - one connection that cannot start must not end the process
                log.exception("could not start a handed connection", **ctx())
                conn.close()
                relay.closed(str(msg["address"][0]))
    finally:
        stop.set()
        receiver.stop()
        with contextlib.suppress(OSError):
            relay.flush()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1])))
