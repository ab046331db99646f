"""Access control against real peers on loopback: DIMSE over mutual TLS (DCMTK as caller and as
destination), HTTPS with bearer tokens, the AE allowlist's log lines, and tokens kept out of the log.

A throwaway PKI is made at test time with the openssl CLI: our CA signs the node's server
certificate and a client certificate; a second, rogue CA signs an intruder's certificate.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pydicom
import pytest
import requests

from dicom_node.config import ConfigError, Destination, HttpConfig, load
from dicom_node.node.security import check_http, http_tokens
from dicom_node.node.send import SendError, send_dimse
from dicom_node_lab import phantom
from dicom_node_lab.peers import NODELAY, REPO, NodeProcess, free_port, need, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import ct_series

pytestmark = pytest.mark.integration

TOKEN_CFG = "cfg-" + secrets.token_hex(16)  # random per run, so finding one in the log is never a coincidence
TOKEN_ENV = "env-" + secrets.token_hex(16)
WRONG_TOKEN = "bad-" + secrets.token_hex(16)
FAR_HOST = "10.255.255.1"  # only ever a string in the allowlist: no traffic goes there


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run([need("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name} test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _leaf(folder: Path, name: str, ca: str, usage: str) -> None:
    """A certificate for 127.0.0.1/localhost signed by ``ca``, with the extensions strict verifiers want."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "rogue")
    _leaf(folder, "server", "ca", "serverAuth")
    _leaf(folder, "client", "ca", "clientAuth")
    _leaf(folder, "intruder", "rogue", "clientAuth")
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CT series on disk (4 slices of 32x32)."""
    folder = tmp_path_factory.mktemp("series")
    p = phantom.generate((4, 32, 32), seed=11)
    for i, ds in enumerate(ct_series(p.image, p.spacing)):
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Path):
    """The node with DIMSE on TLS only (no plain port), HTTPS, and one token in the config, one in the env."""
    root = tmp_path_factory.mktemp("secure-node")
    dicom_port, tls_port, http_port = free_port(), free_port(), free_port()
    extra = {
        "http": [f'cert = "{pki / "server.pem"}"', f'key = "{pki / "server.key"}"', f'tokens = ["{TOKEN_CFG}"]'],
        "node.tls": ["enabled = true", f"port = {tls_port}", f'cert = "{pki / "server.pem"}"',
                     f'key = "{pki / "server.key"}"', f'ca = "{pki / "ca.pem"}"', "handshake_seconds = 4.0"],
        "jobs": ["release_grace_seconds = 0"],  # received series wait (the quiet timer only)
    }
    cfg = write_node_config(root, dicom_port=dicom_port, http_port=http_port, destinations=[],
                            allowed=[("ECHOSCU", "127.0.0.1"), ("STORESCU", "127.0.0.1"), ("FARAWAY", FAR_HOST)],
                            quiet=600, extra=extra)  # quiet: received series wait; nothing here needs inference
    env = {**os.environ, "DICOM_NODE_HTTP_TOKENS": TOKEN_ENV}
    proc = NodeProcess(cfg, http_port, dicom_port, root / "node.log", https_ca=pki / "ca.pem", env=env)
    proc.tls_port = tls_port  # type: ignore[attr-defined]
    try:
        yield proc.start()
    finally:
        proc.stop()


def _tls(pki: Path, who: str = "client") -> tuple[str, ...]:
    return ("+tls", str(pki / f"{who}.key"), str(pki / f"{who}.pem"), "+cf", str(pki / "ca.pem"))


def _echo(port: int, *options: str, calling: str = "ECHOSCU") -> subprocess.CompletedProcess:
    return subprocess.run([need("echoscu"), *options, "-aet", calling, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=NODELAY, timeout=30)


def _logged(node: NodeProcess, text: str) -> bool:
    return text in node.log.read_text(errors="replace")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _get(node: NodeProcess, path: str, token: str | None = None) -> requests.Response:
    return requests.get(f"{node.url}{path}", headers=_auth(token) if token else {}, verify=node.verify, timeout=10)


def _stow(node: NodeProcess, folder: Path, token: str | None) -> requests.Response:
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes()
                    + b"\r\n" for f in sorted(folder.glob("*.dcm"))) + b"--" + boundary.encode() + b"--\r\n"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               **(_auth(token) if token else {})}
    return requests.post(f"{node.url}/dicomweb/studies", data=body, headers=headers, verify=node.verify, timeout=60)


# ---- DIMSE over TLS ---------------------------------------------------------------------------


def test_trusted_client_certificate_is_accepted(node: NodeProcess, pki: Path, series: Path) -> None:
    echo = _echo(node.tls_port, *_tls(pki))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    out = subprocess.run([need("storescu"), *_tls(pki), "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1",
                          str(node.tls_port), "+sd", str(series)], capture_output=True, text=True, env=NODELAY,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    uid = str(pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    jobs = _get(node, f"/jobs?series={uid}", TOKEN_CFG).json()
    assert len(jobs) == 1 and jobs[0]["instances"] == len(list(series.glob("*.dcm")))
    assert _logged(node, "over TLS, client certificates required")


def test_untrusted_missing_and_plain_callers_are_refused(node: NodeProcess, pki: Path) -> None:
    intruder = _echo(node.tls_port, *_tls(pki, "intruder"))  # a certificate from another CA
    assert intruder.returncode != 0
    wait_for(lambda: _logged(node, "client certificate refused: unable to get local issuer certificate"), 10,
             "the log line for the untrusted certificate")
    anonymous = _echo(node.tls_port, "+tla", "+cf", str(pki / "ca.pem"))  # TLS, but no client certificate
    assert anonymous.returncode != 0
    wait_for(lambda: _logged(node, "the client sent no certificate"), 10, "the log line for no certificate")
    plain = _echo(node.tls_port)  # plain DICOM to the TLS port
    assert plain.returncode != 0
    wait_for(lambda: _logged(node, "not a TLS client"), 10, "the log line for a plain caller")
    closed = _echo(node.dicom_port)  # with TLS on and keep_plain off, the plain port is not served at all
    assert closed.returncode != 0
    doubtful = _echo(node.tls_port, "+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf",
                     str(pki / "rogue.pem"))  # the caller does not trust our certificate
    assert doubtful.returncode != 0
    metrics = _get(node, "/metrics", TOKEN_CFG).text
    line = next(x for x in metrics.splitlines() if x.startswith('dicom_node_associations_rejected_total{reason="tls"}'))
    assert float(line.split()[-1]) >= 4
    assert _echo(node.tls_port, *_tls(pki)).returncode == 0  # and the node still serves trusted callers


def test_silent_connection_does_not_hold_up_other_callers(node: NodeProcess, pki: Path) -> None:
    """A connection that never starts the handshake must not block the acceptor, and is dropped in time."""
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as silent:
        start = time.monotonic()
        echo = _echo(node.tls_port, *_tls(pki))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        silent.settimeout(0.2)
        with pytest.raises(socket.timeout):  # served while the silent one still waits for its deadline
            silent.recv(1)
        silent.settimeout(10)
        assert silent.recv(1) == b""  # then the node closes it (handshake_seconds = 4)
        assert 3 < time.monotonic() - start < 9
    wait_for(lambda: _logged(node, "no TLS handshake within 4 s"), 10, "the log line for the silent connection")


def test_allowlist_rejections_say_why(node: NodeProcess, pki: Path) -> None:
    unknown = _echo(node.tls_port, *_tls(pki), calling="NOBODY")
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stdout + unknown.stderr
    wait_for(lambda: _logged(node, "association from 127.0.0.1 rejected: calling AE 'NOBODY' is not in node.allowed"),
             10, "the unknown-AE log line")
    far = _echo(node.tls_port, *_tls(pki), calling="FARAWAY")
    assert far.returncode != 0
    wait_for(lambda: _logged(node, f"calling AE 'FARAWAY' is allowed only from {FAR_HOST}, not from 127.0.0.1"),
             10, "the wrong-host log line")


def test_c_store_to_a_tls_destination(tmp_path: Path, pki: Path, series: Path) -> None:
    """Outgoing: DCMTK storescp requires our client certificate; the node verifies the peer's."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    scp = subprocess.Popen([need("storescp"), "+tls", str(pki / "server.key"), str(pki / "server.pem"), "+cf",
                            str(pki / "ca.pem"), "--require-peer-cert", "-od", str(out), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=NODELAY)
    try:
        wait_for(lambda: _echo(port, *_tls(pki)).returncode == 0, 20, "storescp over TLS")
        files = sorted(series.glob("*.dcm"))
        base = {"name": "tls-pacs", "kind": "dimse", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                "tls": True, "ca": str(pki / "ca.pem"), "timeout_seconds": 10.0}
        dest = Destination(**base, cert=str(pki / "client.pem"), key=str(pki / "client.key"))
        assert send_dimse(files, dest, "DICOMNODE") == len(files)
        assert len(list(out.iterdir())) == len(files)
        with pytest.raises(SendError):  # storescp requires a client certificate
            send_dimse(files, Destination(**base), "DICOMNODE")
        with pytest.raises(SendError):  # we do not trust storescp's certificate
            send_dimse(files, Destination(**{**base, "ca": str(pki / "rogue.pem")}, cert=str(pki / "client.pem"),
                                          key=str(pki / "client.key")), "DICOMNODE")
    finally:
        scp.terminate()
        scp.wait(10)


# ---- HTTP: TLS and bearer tokens --------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("GET", "/jobs"), ("GET", "/jobs/1"), ("GET", "/metrics"), ("GET", "/"),
                                          ("GET", "/jobs/1/pictures/thumb.png"),
                                          ("GET", "/jobs/1/pictures/lesion-1.png"),
                                          ("POST", "/dicomweb/studies"), ("POST", "/dicomweb/studies/1.2.3")])
def test_endpoints_need_a_bearer_token(node: NodeProcess, method: str, path: str) -> None:
    for headers, error in (({}, None), (_auth(WRONG_TOKEN), "invalid_token"),
                           ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_request")):
        r = requests.request(method, f"{node.url}{path}", headers=headers, verify=node.verify, timeout=10)
        assert r.status_code == 401, (headers, r.text)
        challenge = r.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="dicom-node"') and r.json()["detail"]
        assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)


def test_tokens_from_config_and_environment_are_accepted(node: NodeProcess, series: Path) -> None:
    for token in (TOKEN_CFG, TOKEN_ENV):
        assert _get(node, "/jobs", token).status_code == 200
        assert _get(node, "/metrics", token).status_code == 200
        assert "<table>" in _get(node, "/", token).text
    before = len(_get(node, "/jobs", TOKEN_CFG).json())
    refused = _stow(node, series, None)
    assert refused.status_code == 401 and len(_get(node, "/jobs", TOKEN_CFG).json()) == before  # nothing stored
    stored = _stow(node, series, TOKEN_ENV)
    assert stored.status_code == 200, stored.text
    assert len(pydicom.Dataset.from_json(stored.json()).ReferencedSOPSequence) == len(list(series.glob("*.dcm")))


BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def test_a_browser_gets_the_page_shells_without_a_token_but_no_data(node: NodeProcess, series: Path) -> None:
    """The jobs list and a job's page are shells that read the API with the token the user gives them."""
    assert _stow(node, series, TOKEN_CFG).status_code == 200
    job = _get(node, "/jobs", TOKEN_CFG).json()[0]
    for path in ("/", f"/jobs/{job['id']}"):
        shell = requests.get(f"{node.url}{path}", headers=BROWSER, verify=node.verify, timeout=10)
        assert shell.status_code == 200 and "Bearer token" in shell.text
        assert job["series_uid"] not in shell.text and job["description"] not in shell.text
    for path in (f"/jobs/{job['id']}", "/jobs", f"/jobs/{job['id']}/pictures/thumb.png", "/metrics"):
        refused = requests.get(f"{node.url}{path}", headers=BROWSER, verify=node.verify, timeout=10)
        assert refused.status_code == 401 or path == f"/jobs/{job['id']}", path
    as_json = requests.get(f"{node.url}/jobs/{job['id']}", headers={"Accept": "application/json"},
                           verify=node.verify, timeout=10)
    assert as_json.status_code == 401


def test_healthz_is_open_but_shows_details_only_with_a_token(node: NodeProcess) -> None:
    open_ = _get(node, "/healthz")
    assert open_.status_code == 200 and open_.json()["status"] == "ok" and "spool" not in open_.json()
    full = _get(node, "/healthz", TOKEN_CFG).json()
    assert full["status"] == "ok" and full["ae_title"] == "DICOMNODE" and "spool" in full


def test_http_is_served_over_tls_only(node: NodeProcess) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{node.http_port}/healthz", timeout=10)  # plain HTTP to the HTTPS port
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{node.url}/healthz", timeout=10)  # the system's CAs do not vouch for our test CA
    assert _get(node, "/healthz").ok  # and the node still answers


def test_tokens_never_reach_the_log(node: NodeProcess, series: Path) -> None:
    for token in (TOKEN_CFG, TOKEN_ENV, WRONG_TOKEN):
        for path in ("/jobs", "/jobs/1", "/metrics", "/", "/healthz", "/nowhere"):
            _get(node, path, token)
    assert _stow(node, series, TOKEN_CFG).status_code == 200
    marker = f"/jobs/{secrets.token_hex(4)}"  # a refused request whose log line we can wait for
    _get(node, marker, WRONG_TOKEN)
    wait_for(lambda: _logged(node, f"HTTP GET {marker} from 127.0.0.1 refused: the bearer token is not valid"), 10,
             "the refused request's log line")
    text = node.log.read_text(errors="replace")
    for token in (TOKEN_CFG, TOKEN_ENV, WRONG_TOKEN):
        assert token not in text
    assert "Bearer " not in text.replace("Authorization: Bearer <token>", "")


# ---- Refusing weak HTTP setups ----------------------------------------------------------------


def test_network_facing_http_without_tokens_is_refused_at_start(tmp_path: Path) -> None:
    """The check runs before anything listens; 192.0.2.1 (TEST-NET) could not even be bound."""
    cfg = write_node_config(tmp_path, dicom_port=free_port(), http_port=free_port(), destinations=[], allowed=[],
                            extra={"http": ['host = "192.0.2.1"', 'token_env = ""']})
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    assert "reachable from the network, but no tokens are configured" in out.stderr


def test_http_exposure_rules() -> None:
    assert check_http(HttpConfig(host="127.0.0.1"), []) == []
    assert check_http(HttpConfig(host="::1"), []) == []
    with pytest.raises(ConfigError, match="no tokens"):
        check_http(HttpConfig(host="0.0.0.0"), [])
    warnings = check_http(HttpConfig(host="0.0.0.0", allow_anonymous=True), [])
    assert any("WITHOUT AUTHENTICATION" in w for w in warnings) and any("without TLS" in w for w in warnings)
    assert [w for w in check_http(HttpConfig(host="0.0.0.0"), [TOKEN_CFG]) if "clear text" in w]
    with pytest.raises(ConfigError, match="cannot load"):
        check_http(HttpConfig(cert="/nonexistent.pem", key="/nonexistent.key"), [])


def test_tokens_come_from_config_and_environment() -> None:
    cfg = HttpConfig(tokens=[TOKEN_CFG], token_env="MY_TOKENS")
    assert http_tokens(cfg, {"MY_TOKENS": f" {TOKEN_ENV}, {WRONG_TOKEN}\n"}) == [TOKEN_CFG, TOKEN_ENV, WRONG_TOKEN]
    assert http_tokens(cfg, {}) == [TOKEN_CFG]
    with pytest.raises(ConfigError, match="token #2 is shorter") as exc:
        http_tokens(cfg, {"MY_TOKENS": "short"})
    assert "short" not in str(exc.value).replace("shorter", "")  # the message names no token


@pytest.mark.parametrize("text, message", [
    ("[node.tls]\nenabled = true\n", "needs cert and key"),
    ('[node.tls]\nenabled = true\ncert = "c.pem"\nkey = "k.pem"\n', "require_client_cert needs ca"),
    ('[node]\nport = 2762\n[node.tls]\nenabled = true\ncert = "c"\nkey = "k"\nca = "a"\nkeep_plain = true\n',
     "keep_plain needs two ports"),
    ('[http]\ncert = "c.pem"\n', "cert and key go together"),
    ('[http]\ntokens = "one"\n', "must be an array"),
    ('[[destinations]]\nname = "w"\nkind = "stow"\nurl = "https://x"\ntls = true\n', "tls is for dimse"),
])
def test_bad_tls_settings_are_refused_at_load(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(f)


def test_certificate_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[node.tls]\nenabled = true\ncert = "pki/s.pem"\nkey = "pki/s.key"\nca = "/etc/ca.pem"\n'
                 '[http]\ncert = "pki/h.pem"\nkey = "pki/h.key"\n')
    cfg = load(f)
    assert cfg.node.tls.cert == str(tmp_path / "pki" / "s.pem") and cfg.node.tls.ca == "/etc/ca.pem"
    assert cfg.http.key == str(tmp_path / "pki" / "h.key")
