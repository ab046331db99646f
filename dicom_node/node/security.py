"""Access control: TLS for DIMSE (both directions) and HTTP, and bearer tokens on the HTTP side.

DIMSE over TLS follows PS3.15 Annex B (the BCP 195 profile: TLS 1.2 or later): the node
presents its certificate and, by default, refuses any caller whose certificate does not
chain to the configured CA. The AE allowlist still applies on top, so a stolen
certificate alone does not let a foreign AE title in.

HTTP tokens are deny-by-default: every path except ``/healthz`` needs one, so an endpoint
added later is never public by accident. Tokens are compared in constant time and never
logged; only their count is.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.config import ConfigError, Destination, HttpConfig, TlsConfig
from dicom_node.node.logs import ctx
from dicom_node.node.pages import wants_html

log = logging.getLogger("dicom_node.node.security")

MIN_TOKEN_CHARS = 16  # a short token on a hospital network is a guessable password
OPEN_PATHS = frozenset({"/healthz"})
# The operator's page shells (pages.py) hold no data: a browser navigating to them gets the shell
# without a token, and the shell asks for one before it reads anything. Only a navigation (Accept:
# text/html first) opens them; the same paths asked for JSON stay behind the token.
PAGE_PATHS = re.compile(r"^/(jobs/[0-9]{1,18})?$")


# ---- DIMSE over TLS -----------------------------------------------------------------------


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The listener's context; a missing or unreadable file is a config error at start, not at the first caller."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            context.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load the certificate, key or CA: {exc}") from None
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if tls.ca else ssl.CERT_NONE
    return context


def client_context(dest: Destination) -> ssl.SSLContext:
    """For C-STORE to a TLS peer: verify its certificate and name, and present ours when configured."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.ca or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if dest.cert:
            context.load_cert_chain(dest.cert, dest.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destination {dest.name}: cannot load the TLS certificate, key or CA: {exc}") from None
    return context


def _handshake_failure(exc: BaseException, seconds: float) -> str:
    """A reason an operator can act on, from OpenSSL's terse error codes."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no TLS handshake within {seconds:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate refused: {exc.verify_message}"
    reason = str(getattr(exc, "reason", "") or "")
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "UNSUPPORTED_PROTOCOL",
                  "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return f"not a TLS client (plain DICOM on the TLS port?): {reason}"
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
        return "the client sent no certificate"
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN"):
        return f"the client does not trust our certificate ({reason})"
    return f"TLS handshake failed: {reason or exc.__class__.__name__} {exc}".strip()


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop.

    pynetdicom wraps each accepted socket in the acceptor thread and shakes hands there, so one
    client that connects and says nothing stalls every other caller. Here each connection shakes
    hands in its own thread under a deadline, and a refused handshake is logged with the reason.
    """

    handshake_seconds: float = 10.0
    on_tls_refused: Callable[[str, str], None] | None = None  # (peer address, reason), for metrics

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            address = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
            before = request.gettimeout()
            try:
                request.settimeout(self.handshake_seconds)
                request.do_handshake()
                request.settimeout(before)
            except (OSError, ValueError) as exc:  # SSLError, timeout, reset: refuse this one, keep serving
                why = _handshake_failure(exc, self.handshake_seconds)
                log.warning("TLS connection from %s refused: %s", address, why, **ctx(peer=address))
                if self.on_tls_refused is not None:
                    self.on_tls_refused(address, why)
                self.shutdown_request(request)
                return
            subject = dict(item[0] for item in (request.getpeercert() or {}).get("subject", ()))
            log.debug("TLS connection from %s: certificate CN=%s", address, subject.get("commonName", "-"),
                      **ctx(peer=address))
        super().process_request_thread(request, client_address)


# ---- HTTP ---------------------------------------------------------------------------------


def http_tokens(cfg: HttpConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Tokens from the config and from ``cfg.token_env`` (comma or whitespace separated)."""
    env = os.environ if environ is None else environ
    tokens = [t.strip() for t in cfg.tokens if t.strip()]
    if cfg.token_env:
        tokens += [t for t in re.split(r"[\s,]+", env.get(cfg.token_env, "")) if t]
    for i, token in enumerate(tokens):
        if len(token) < MIN_TOKEN_CHARS:  # say which one by position, never by value
            raise ConfigError(f"http: token #{i + 1} is shorter than {MIN_TOKEN_CHARS} characters")
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or "": assume reachable from the network


def check_http(cfg: HttpConfig, tokens: list[str]) -> list[str]:
    """Refuse unreadable TLS files and an open, non-loopback HTTP server; return warnings for weaker setups."""
    if cfg.cert:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cfg.cert, cfg.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"http: cannot load the certificate or key: {exc}") from None
    if is_loopback(cfg.host):
        return []
    if not tokens and not cfg.allow_anonymous:
        raise ConfigError(f"http.host is {cfg.host!r}, reachable from the network, but no tokens are configured: "
                          "anyone could store instances and read the job list. Set http.tokens or "
                          f"${cfg.token_env}, or http.allow_anonymous = true to accept that risk")
    warnings = []
    if not tokens:
        warnings.append(f"HTTP on {cfg.host}:{cfg.port} WITHOUT AUTHENTICATION (http.allow_anonymous = true): "
                        "anyone who can reach it can store instances and read the job list")
    if not cfg.cert:
        warnings.append(f"HTTP on {cfg.host}:{cfg.port} without TLS: bearer tokens and patient data cross the "
                        "network in clear text (set http.cert and http.key, or put a TLS proxy in front)")
    return warnings


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class BearerAuth:
    """ASGI middleware: a valid ``Authorization: Bearer`` token, or 401 with the reason.

    Open paths still run, with ``request.state.authorized`` telling them whether to show details.
    """

    def __init__(self, app: ASGIApp, tokens: list[str], on_refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens]
        self.on_refused = on_refused

    def _refusal(self, scope: Scope) -> tuple[str, str] | None:
        """(RFC 6750 error code or "", description), or None for a valid token."""
        header = _header(scope, b"authorization")
        if header is None:
            return "", "no bearer token (send Authorization: Bearer <token>)"
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return "invalid_request", "the Authorization header is not a bearer token"
        given = given.strip()
        ok = False
        for token in self.tokens:  # every token compared: timing says nothing about which was close
            ok |= hmac.compare_digest(token, given)
        return None if ok else ("invalid_token", "the bearer token is not valid")

    @staticmethod
    def _page_shell(scope: Scope) -> bool:
        return (scope.get("method") == "GET" and PAGE_PATHS.match(scope["path"]) is not None
                and wants_html((_header(scope, b"accept") or b"").decode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        scope.setdefault("state", {})["authorized"] = refusal is None
        if refusal is None or scope["path"] in OPEN_PATHS or self._page_shell(scope):
            await self.app(scope, receive, send)
            return
        code, why = refusal
        client = scope.get("client") or ("?", 0)
        log.warning("HTTP %s %s from %s refused: %s", scope.get("method", "?"), scope["path"], client[0], why,
                    **ctx(peer=str(client[0])))
        if self.on_refused is not None:
            self.on_refused(code or "missing")
        challenge = 'Bearer realm="dicom-node"' + (f', error="{code}", error_description="{why}"' if code else "")
        response = JSONResponse({"detail": why}, status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)
