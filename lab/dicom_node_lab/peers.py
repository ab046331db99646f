"""Real peers on loopback, for the tests and the benchmarks: free ports, a node subprocess, a private
Orthanc, DCMTK's storescu and echoscu.

Every peer binds to 127.0.0.1 with its own config, storage and ports, and is stopped by whoever
started it. A peer that does not come up, or a wait that runs out, raises PeerError (an
AssertionError, so a test reports it as its failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from dicom_node.config import DEFAULT_MODEL
from dicom_node.config import REPO as PRODUCT_REPO

REPO = PRODUCT_REPO  # where the node runs from (its working directory in the tests)
# The node runs the shipped model; DICOM_NODE_TEST_MODEL points at another ONNX with the same contract.
MODEL = Path(os.environ.get("DICOM_NODE_TEST_MODEL", DEFAULT_MODEL))
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
NODELAY = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK and Orthanc stall ~44 ms per instance without it


class PeerError(AssertionError):
    """A peer did not start, a tool is missing, or a wait ran out."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on and this test session has not handed out before.

    The kernel may return the same ephemeral port to two bind-and-release calls in a row (CI once gave
    Orthanc one port for both DICOM and HTTP), so ports already given out are skipped.
    """
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh loopback port after 100 tries")


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll until check() is truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise PeerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def need_model() -> Path:
    if not MODEL.is_file():
        raise PeerError(f"no model at {MODEL} (engines/dense_unet.onnx is produced by tools/export.py)")
    return MODEL


def need(exe: str) -> str:
    path = shutil.which(exe)
    if path is None:
        raise PeerError(f"{exe} not installed (.ci/run installs orthanc, orthanc-dicomweb and dcmtk)")
    return path


def write_node_config(root: Path, *, dicom_port: int, http_port: int, destinations: list[dict[str, Any]],
                      allowed: list[tuple[str, str]], quiet: float = 1.5, retries: int = 3,
                      backoff: float = 0.5, extra: dict[str, list[str]] | None = None, name: str = "node",
                      spool: Path | None = None) -> Path:
    """A complete config.toml for a test node (TOML written by hand: the format is tiny), as
    ``root/<name>.toml``; the spool is ``root/spool`` unless ``spool`` names a shared one.

    ``extra`` adds lines to the [node], [http], [spool] or [jobs] table, or adds a table (e.g. "node.tls",
    "intake") at the end."""
    ex = dict(extra or {})
    lines = [
        "[engine]", f'model = "{need_model()}"', 'backend = "onnxruntime"', "threads = 2", "",
        "[node]", 'ae_title = "DICOMNODE"', f"port = {dicom_port}", *ex.pop("node", []), "",
        *sum(([ "[[node.allowed]]", f'ae_title = "{a}"', f'host = "{h}"', ""] for a, h in allowed), []),
        "[http]", f"port = {http_port}", *ex.pop("http", []), "",
        "[spool]", f'dir = "{spool or root / "spool"}"', "min_free_mb = 16", *ex.pop("spool", []), "",
        "[jobs]", f"quiet_seconds = {quiet}", "workers = 2", f"retries = {retries}",
        *([] if any(v.startswith("backoff_seconds") for v in ex.get("jobs", [])) else [f"backoff_seconds = {backoff}"]),
        *ex.pop("jobs", []), "",
    ]
    for d in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in d.items()]
        lines.append("")
    for table, table_lines in ex.items():
        lines += [f"[{table}]", *table_lines, ""]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


class NodeProcess:
    """``dicom-node serve`` in a subprocess, exactly as an operator runs it."""

    def __init__(self, config: Path, http_port: int, dicom_port: int, log: Path, https_ca: Path | None = None,
                 env: dict[str, str] | None = None, role: str = "all") -> None:
        self.config, self.http_port, self.dicom_port, self.log = config, http_port, dicom_port, log
        self.role = role
        self.verify: str | bool = str(https_ca) if https_ca else True  # requests' verify= for an HTTPS node
        self.scheme = "https" if https_ca else "http"
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    def start(self) -> NodeProcess:
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config),
                                      "--role", self.role], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                     env=self.env)
        out.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise PeerError(f"node exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return requests.get(f"{self.url}/healthz", timeout=1, verify=self.verify).ok
            except requests.RequestException:
                return False
        wait_for(up, 60, "the node's /healthz")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def jobs(self, **params: Any) -> list[dict[str, Any]]:
        return requests.get(f"{self.url}/jobs", params=params, timeout=5).json()


# The shipped, documented routing examples are exactly what the tests run.
LUA = REPO / "dicom_node" / "node" / "orthanc"


class Orthanc:
    """A private Orthanc 1.10 with DICOMweb, on loopback (RemoteAccessAllowed false), as the test PACS."""

    def __init__(self, root: Path, node_dicom_port: int, node_http_port: int, route: str | None) -> None:
        """``route`` "dimse" or "stow": the Lua rule that routes stable series to the node; None: none."""
        self.root = root
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.aet = "ORTHANC"
        (root / "storage").mkdir(parents=True, exist_ok=True)
        lua = [str(LUA / f"route-{route}.lua")] if route else []
        cfg = {
            "Name": "test-pacs", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "storage"),
            "DicomAet": self.aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckModalityHost": True,
            "DicomModalities": {"dicomnode": ["DICOMNODE", "127.0.0.1", node_dicom_port]},
            "StableAge": 2, "LuaScripts": lua, "SaveJobs": False, "HttpTimeout": 60,
            "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.http_port}",
                         "Servers": {"dicomnode": [f"http://127.0.0.1:{node_http_port}/dicomweb/"]}},
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(cfg, indent=2))
        self.log = root / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        exe = need("Orthanc")
        out = self.log.open("ab")
        self.proc = subprocess.Popen([exe, str(self.config)], stdout=out, stderr=subprocess.STDOUT, env=NODELAY,
                                     cwd=self.root)
        out.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise PeerError(f"Orthanc exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return requests.get(f"{self.url}/system", timeout=1).ok
            except requests.RequestException:
                return False
        wait_for(up, 30, "Orthanc's REST API")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def get(self, path: str) -> Any:
        r = requests.get(f"{self.url}{path}", timeout=10)
        r.raise_for_status()
        return r.json()

    def file(self, instance_id: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        r.raise_for_status()
        return r.content

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series of a study, with its main tags and instance ids."""
        found = requests.post(f"{self.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID":
                              study_uid}}, timeout=10).json()
        if not found:
            return []
        return self.get(f"/studies/{found[0]}/series")


def storescu(host_port: tuple[str, int], called: str, folder: Path, calling: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> None:
    exe = need("storescu")
    out = subprocess.run([exe, *extra, "-aet", calling, "-aec", called, host_port[0], str(host_port[1]), "+sd",
                          str(folder)],
                         capture_output=True, text=True, env=NODELAY, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def echoscu(port: int, called: str, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run([need("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=NODELAY, timeout=30)


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's postgresql package puts it."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise PeerError(f"{name} not found: install PostgreSQL (Debian: apt-get install postgresql)")
    return str(candidates[-1])


class PostgresCluster:
    """A private PostgreSQL cluster in a temporary folder, on loopback and a free port, with its own socket
    folder; removed by :meth:`stop`.

    PostgreSQL refuses to run as root, so as root (CI) ``initdb`` and ``pg_ctl`` run as the ``postgres``
    user, in a folder that user owns. Trust authentication on 127.0.0.1 only: a test cluster that lives
    for one test session.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "postgres.log"
        self.as_root = os.geteuid() == 0

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "postgres", "--", *cmd] if self.as_root else list(cmd)
        out = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise PeerError(f"{' '.join(cmd[:2])} failed ({out.returncode}): {(out.stderr or out.stdout)[-2000:]}")
        return out

    def start(self) -> PostgresCluster:
        self.sockets.mkdir()
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        self._run(_postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        return self.restart()

    def restart(self) -> PostgresCluster:
        """Start the server on the existing cluster (after :meth:`stop`, a crash included)."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=on"
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database (one per test keeps tests apart); returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        """``mode`` "immediate" is a crash as far as the data is concerned (no checkpoint)."""
        if self.data.is_dir():
            with contextlib.suppress(PeerError):  # not running: nothing to stop
                self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
