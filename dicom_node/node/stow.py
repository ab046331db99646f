"""STOW-RS bodies (PS3.18 §10.5): multipart/related parsed strictly (RFC 2046), from memory or from a
body streamed to disk.

A body is never held in memory: a DelimiterScanner finds its delimiters as it streams past (and refuses
more parts than a request may hold as soon as it sees them), the body goes to a file, and a BodyFile
reads back only what the parser asks for, one part at a time.
"""

from __future__ import annotations

import bisect
import os
import re


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


def dash_boundary(content_type: str) -> bytes:
    """The delimiter line a multipart body declares in its Content-Type (--boundary), checked; MultipartError else."""
    boundary = media_type(content_type)[1].get("boundary", "")
    if not boundary:
        raise MultipartError("Content-Type has no boundary")
    if not _BOUNDARY.fullmatch(boundary):
        raise MultipartError("the boundary must be 1 to 200 printable ASCII characters")
    return b"--" + boundary.encode("ascii")


MAX_PART_HEADER_BYTES = 16384  # a part's header fields; longer is not a STOW-RS client


def multipart_spans(body: bytes | BodyFile, content_type: str) -> list[tuple[dict[str, str], int, int]]:
    """Where the parts of a multipart/related body (RFC 2046) are: each part's headers (lower-case names)
    and the start and end of its content. Works on bytes, or on a BodyFile without reading it into memory.

    Strict where leniency would lose or invent data: the boundary must be declared, a delimiter
    only counts at the start of a line, every part needs its blank line after the headers, and
    the body must end with the closing delimiter, else it was cut off. Raises MultipartError only.
    """
    dash = dash_boundary(content_type)
    delimiter = b"\r\n" + dash
    if body[:len(dash)] == dash:
        pos = 0
    else:  # a preamble before the first delimiter is allowed, and ignored
        pos = body.find(delimiter)
        if pos < 0:
            raise MultipartError("no parts found in the body (the boundary never starts a line)")
        pos += 2
    spans: list[tuple[dict[str, str], int, int]] = []
    while True:
        pos += len(dash)
        if body[pos:pos + 2] == b"--":
            break  # the closing delimiter; an epilogue after it is ignored
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise MultipartError("the body ends after a delimiter (truncated: no closing delimiter)")
        if body[pos:eol].strip(b" \t"):
            raise MultipartError("a delimiter is followed by other text on its line")
        end = body.find(delimiter, eol + 2)
        if end < 0:
            raise MultipartError("the body ends inside a part (truncated: no closing delimiter)")
        headers, start = _part_headers(body, eol + 2, end)
        spans.append((headers, start, end))
        pos = end + 2
    if not spans:
        raise MultipartError("no parts found in the body")
    return spans


def split_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body held in memory, each with its headers (see multipart_spans)."""
    return [(headers, body[start:end]) for headers, start, end in multipart_spans(body, content_type)]


def _part_headers(body: bytes | BodyFile, start: int, end: int) -> tuple[dict[str, str], int]:
    """One part's header fields, and where its content starts."""
    if body[start:start + 2] == b"\r\n":
        return {}, start + 2  # no header fields at all
    head_end = body.find(b"\r\n\r\n", start, min(end, start + MAX_PART_HEADER_BYTES))
    if head_end < 0:
        raise MultipartError("a part has no blank line (CRLF CRLF) between its headers and its content")
    headers: dict[str, str] = {}
    for line in body[start:head_end].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon and name.strip():
            headers[name.strip().lower()] = value.strip()
    return headers, head_end + 4


class BodyTooLargeError(ValueError):
    """The request body passed http.max_body_mb."""


class DelimiterScanner:
    """Finds a body's delimiters as it streams past, in constant memory per chunk: where each part
    starts and ends, without reading the body back (and how many parts a body had that the spool
    could not take). Refuses, as soon as it sees them, more parts than a request may hold."""

    def __init__(self, dash: bytes, max_parts: int) -> None:
        self.dash = dash
        self.delimiter = b"\r\n" + dash
        self.max_parts = max_parts
        self.offsets: list[int] = []  # where each CRLF--boundary starts
        self.head = b""  # the body's first bytes: does it open with the boundary (no CRLF before it)?
        self._tail = b""
        self._seen = 0

    def feed(self, chunk: bytes) -> None:
        if len(self.head) < len(self.dash):
            self.head += chunk[:len(self.dash) - len(self.head)]
        data = self._tail + chunk
        base = self._seen - len(self._tail)
        at = data.find(self.delimiter)
        while at >= 0:
            self.offsets.append(base + at)
            at = data.find(self.delimiter, at + 1)
        if len(self.offsets) > self.max_parts + 1:
            raise BodyTooLargeError(f"more than http.max_parts = {self.max_parts} parts")
        self._tail = data[-(len(self.delimiter) - 1):]
        self._seen += len(chunk)

    @property
    def parts(self) -> int:
        """Parts seen (the closing delimiter is one of the delimiters)."""
        return max(1, len(self.offsets) + (self.head == self.dash) - 1)


class BodyFile:
    """A request body on disk, read only where asked: the little ``multipart_spans`` needs of bytes and
    ``find``, with the delimiters already located by a DelimiterScanner. Pages are read with pread into
    short-lived buffers, so the node's resident memory does not grow with the body."""

    WINDOW = 65536  # how far a search other than for a delimiter looks (a delimiter line, part headers)

    def __init__(self, fd: int, size: int, scanner: DelimiterScanner) -> None:
        self.fd, self.size, self.scanner = fd, size, scanner

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(self.size)
        return os.pread(self.fd, max(0, stop - start), start) if stop > start else b""

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self.size if end is None else min(end, self.size)
        if sub == self.scanner.delimiter:
            offsets = self.scanner.offsets
            i = bisect.bisect_left(offsets, start)
            return offsets[i] if i < len(offsets) and offsets[i] + len(sub) <= end else -1
        window = self[start:min(end, start + self.WINDOW)]
        at = window.find(sub)
        return start + at if at >= 0 else -1
