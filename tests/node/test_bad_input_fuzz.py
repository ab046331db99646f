"""Property-based fuzzing (hypothesis) of everything that parses outside input: the STOW-RS
multipart parser, series assembly, and the intake checks.

Derandomized (each test's examples are fixed by its code) and bounded: 200 examples for pure
functions, a few dozen for anything that touches disk, so CI runs the same cases in seconds.
"""

from __future__ import annotations

import io
import math
import string
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.node.intake import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    SUCCESS,
    Intake,
)
from dicom_node.node.stow import (
    BodyFile,
    DelimiterScanner,
    MultipartError,
    dash_boundary,
    media_type,
    multipart_spans,
    split_multipart,
)
from dicom_node.pipeline.series import SeriesError, load_hu, order_series, read_ct_series, slice_normal

from .test_node_queue import Parts

PURE = settings(max_examples=200, derandomize=True, deadline=None, database=None)
DISK = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# -- STOW-RS multipart -------------------------------------------------------------------------
BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=? \"\\{}"
boundaries = st.text(alphabet=BCHARS, min_size=1, max_size=200).filter(lambda b: b == b.strip())
header_names = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=12)
header_values = st.text(alphabet=string.printable[:95], max_size=30).filter(lambda v: v == v.strip())
parts = st.lists(st.tuples(st.dictionaries(header_names, header_values, max_size=3), st.binary(max_size=120)),
                 min_size=1, max_size=4)


def _ctype(boundary: str) -> str:
    quoted = boundary.replace("\\", "\\\\").replace('"', '\\"')
    return f'multipart/related; type="application/dicom"; boundary="{quoted}"'


def _body(items: list[tuple[dict[str, str], bytes]], boundary: str, preamble: bytes = b"",
          epilogue: bytes = b"") -> bytes:
    dash = b"--" + boundary.encode()
    out = preamble + b"\r\n" if preamble else b""
    for headers, data in items:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        out += dash + b"\r\n" + head + b"\r\n" + data + b"\r\n"
    return out + dash + b"--" + epilogue


@PURE
@given(items=parts, boundary=boundaries, preamble=st.binary(max_size=20), epilogue=st.binary(max_size=20))
def test_split_multipart_round_trips(items: list[tuple[dict[str, str], bytes]], boundary: str, preamble: bytes,
                                     epilogue: bytes) -> None:
    delimiter = b"\r\n--" + boundary.encode()
    assume(all(delimiter not in b"\r\n" + data for _, data in items))  # RFC 2046: the sender picks a boundary
    assume(delimiter not in b"\r\n" + preamble)
    assert split_multipart(_body(items, boundary, preamble, epilogue), _ctype(boundary)) == items


@st.composite
def broken_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    """A well-formed body, then cut, spliced and mangled; or plain noise."""
    if draw(st.booleans()):
        noise = draw(st.binary(max_size=300))
        return noise, draw(st.one_of(st.text(max_size=100), st.text(max_size=30).map(
            lambda b: f"multipart/related; boundary={b}"), boundaries.map(_ctype)))
    boundary = draw(boundaries)
    body = _body(draw(parts), boundary)
    dash = b"--" + boundary.encode()
    for op in draw(st.lists(st.sampled_from(["cut", "drop", "insert", "lf", "flip"]), min_size=1, max_size=3)):
        i = draw(st.integers(0, len(body)))
        if op == "cut":
            body = body[:i]
        elif op == "drop":
            body = body[:i] + body[draw(st.integers(i, len(body))):]
        elif op == "insert":
            body = body[:i] + draw(st.sampled_from([b"\r\n", b"--", dash, b"\r\n\r\n", b"\r\n" + dash, b"\xff"])) + \
                body[i:]
        elif op == "lf":
            body = body.replace(b"\r\n", b"\n", draw(st.integers(1, 3)))
        elif body:
            j = min(i, len(body) - 1)
            body = body[:j] + bytes([body[j] ^ draw(st.integers(1, 255))]) + body[j + 1:]
    ctype = draw(st.sampled_from([_ctype(boundary), _ctype(boundary).upper(), "multipart/related",
                                  f"multipart/related; boundary={boundary}", "multipart/related; boundary=",
                                  'multipart/related; boundary="unterminated', "multipart/related; boundary=é",
                                  _ctype(boundary) + "; boundary=other", "multipart/related; boundary=" + "b" * 80]))
    return body, ctype


@PURE
@given(request=broken_requests())
def test_split_multipart_raises_only_multipart_error(request: tuple[bytes, str]) -> None:
    body, ctype = request
    try:
        found = split_multipart(body, ctype)
    except MultipartError:
        return
    assert found and all(isinstance(h, dict) and isinstance(d, bytes) for h, d in found)


def _streamed_spans(body: bytes, ctype: str, cuts: list[int], tmp: Path) -> list[tuple[dict[str, str], bytes]]:
    """What the node's streaming path finds: the body fed to a DelimiterScanner in chunks cut at ``cuts``,
    written to disk, and read back through a BodyFile."""
    scanner = DelimiterScanner(dash_boundary(ctype), 10**6)
    edges = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
    for a, b in zip(edges, edges[1:], strict=False):
        scanner.feed(body[a:b])
    path = tmp / "body"
    path.write_bytes(body)
    with path.open("rb") as f:
        view = BodyFile(f.fileno(), len(body), scanner)
        return [(h, view[a:b]) for h, a, b in multipart_spans(view, ctype)]


@PURE
@given(request=broken_requests(), cuts=st.lists(st.integers(0, 10**4), max_size=6))
def test_streamed_body_reads_exactly_as_one_in_memory(request: tuple[bytes, str], cuts: list[int]) -> None:
    """The node scans a body for delimiters as it streams past, in chunks of any size, and parses it from
    disk; the parts (or the refusal) are exactly those of the same body parsed in memory."""
    body, ctype = request
    try:
        expected: Any = split_multipart(body, ctype)
    except MultipartError:
        expected = MultipartError
    with tempfile.TemporaryDirectory() as tmp:
        try:
            found: Any = _streamed_spans(body, ctype, cuts, Path(tmp))
        except MultipartError:
            found = MultipartError
    assert found == expected


@PURE
@given(value=st.text(max_size=120))
def test_media_type_never_raises(value: str) -> None:
    mtype, params = media_type(value)
    assert mtype == mtype.lower() and all(k == k.lower() for k in params)


def test_stow_endpoint_never_answers_500(tmp_path: Path) -> None:
    """The whole STOW-RS handler over broken requests: always an answer from the documented set."""
    from fastapi.testclient import TestClient

    from dicom_node.node.http import create_app

    p = Parts(tmp_path)
    client = TestClient(create_app(p.store, p.intake, p.metrics, {}))

    @settings(max_examples=60, derandomize=True, deadline=None, database=None)
    @given(request=broken_requests())
    def post(request: tuple[bytes, str]) -> None:
        body, ctype = request
        r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype.encode("latin-1",
                                                                                                   "replace")})
        assert r.status_code in (200, 202, 400, 409, 415), r.text

    try:
        post()
    finally:
        p.store.close()


# -- series assembly ---------------------------------------------------------------------------
def _raw(keyword: str, vr: str, value: bytes) -> RawDataElement:
    """An element as it comes out of a file, converted only when read (as pydicom does)."""
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    return RawDataElement(tag, vr, len(value), value, 0, False, True)


DS_NOISE = [b"", b"abc", b"nan\\0\\0", b"1\\2", b"1e999\\0\\0", b"0\\0\\0\\0\\0\\0", b"-inf\\1\\0\\0\\1\\0",
            b"1\\0\\0\\0\\1\\0\\7", b"1e300\\1e300\\1e300", b"0.1\\0.1", b"-1\\-1", b"\xff\xfe"]
US_NOISE = [b"", b"\x00\x00", b"\xff\xff", b"\x04\x00\x04\x00", b"\x01", b"\x00\x10"]
GEOMETRY = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns")


def _vec(ds: Dataset, keyword: str, n: int) -> np.ndarray | None:
    """The attribute as n floats, or None when an earlier perturbation already broke it."""
    try:
        v = np.asarray([float(x) for x in getattr(ds, keyword)], float)
    except (AttributeError, TypeError, ValueError):
        return None
    return v if v.shape == (n,) else None


@st.composite
def perturbed_series(draw: st.DrawFn) -> list[tuple[Path, Dataset]]:
    """A regular little volume (any orientation), then a handful of the things real headers get wrong."""
    n = draw(st.integers(1, 6))
    rows, cols = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    dz = draw(st.sampled_from([0.3, 0.5, 1.0, 2.5]))
    a, b = draw(st.floats(0, 2 * math.pi)), draw(st.floats(0, math.pi / 3))
    row = np.array([math.cos(a), math.sin(a), 0.0])
    col = np.cross([0.0, 0.0, 1.0], row) * math.cos(b) + np.array([0.0, 0.0, math.sin(b)])
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    origin = np.array(draw(st.tuples(*[st.floats(-300, 300)] * 3)))
    frame = "1.2.826.0.1.3680043.10.9.1"  # fixed UIDs: the same draws must give the same bytes
    headers = []
    for i in range(n):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.9.2.{i}"
        ds.FrameOfReferenceUID = frame
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + normal * dz * i]
        ds.PixelSpacing = [0.5, 0.5]
        ds.Rows, ds.Columns = rows, cols
        headers.append(ds)
    for op in draw(st.lists(st.sampled_from(["drop", "noise", "jitter", "dup", "size", "tilt", "frame", "orient",
                                             "remove"]), max_size=3)):
        if not headers:
            break
        i = draw(st.integers(0, len(headers) - 1))
        ds = headers[i]
        if op == "drop":
            kw = draw(st.sampled_from([*GEOMETRY, "FrameOfReferenceUID"]))
            if kw in ds:
                delattr(ds, kw)
        elif op == "noise":
            kw = draw(st.sampled_from(GEOMETRY))
            vr, noise = ("US", US_NOISE) if kw in ("Rows", "Columns") else ("DS", DS_NOISE)
            ds[pydicom.datadict.tag_for_keyword(kw)] = _raw(kw, vr, draw(st.sampled_from(noise)))
        elif op == "jitter" and (ipp := _vec(ds, "ImagePositionPatient", 3)) is not None:
            ds.ImagePositionPatient = [round(float(v), 4) for v in ipp + normal * draw(st.floats(-2 * dz, 2 * dz))]
        elif op == "dup":
            headers.append(pydicom.Dataset(ds))
        elif op == "size":
            setattr(ds, draw(st.sampled_from(["Rows", "Columns"])), draw(st.integers(1, 9)))
        elif op == "tilt":
            for k, other in enumerate(headers):
                if (ipp := _vec(other, "ImagePositionPatient", 3)) is not None:
                    other.ImagePositionPatient = [round(float(v), 4) for v in ipp + col * 0.2 * k]
        elif op == "frame":
            ds.FrameOfReferenceUID = f"1.2.826.0.1.3680043.10.9.3.{i}"
        elif op == "orient" and (iop := _vec(ds, "ImageOrientationPatient", 6)) is not None:
            ds.ImageOrientationPatient = [round(float(v) + draw(st.floats(-0.02, 0.02)), 6) for v in iop]
        elif op == "remove":
            del headers[i]
    return [(Path(f"{k}.dcm"), ds) for k, ds in enumerate(headers)]


@PURE
@given(items=perturbed_series())
def test_order_series_accepts_only_regular_volumes(items: list[tuple[Path, Dataset]]) -> None:
    """Any header mix either fails with a SeriesError (the reason a person reads) or is a volume
    whose every slice is there once, in order, evenly spaced, with one size, orientation and frame."""
    try:
        s = order_series("1.2.3", items)
    except SeriesError as exc:
        assert str(exc).startswith("series 1.2.3: ")
        return
    pairs = dict(items)
    assert sorted(s.files) == sorted(pairs) and len(s.files) >= 2
    assert all(pairs[f] is h for f, h in zip(s.files, s.headers, strict=True))
    normal = slice_normal(s.headers[0])
    pos = np.array([np.dot(np.asarray(h.ImagePositionPatient, float), normal) for h in s.headers])
    steps = np.diff(pos)
    dz, dy, dx = s.spacing
    assert all(math.isfinite(v) and v > 0 for v in s.spacing)
    assert np.all(steps > 0) and np.allclose(steps, dz, rtol=0.05, atol=1e-3)
    assert len({(int(h.Rows), int(h.Columns)) for h in s.headers}) == 1
    iop = np.asarray(s.headers[0].ImageOrientationPatient, float)
    assert all(np.allclose(np.asarray(h.ImageOrientationPatient, float), iop, atol=1e-3) for h in s.headers)
    assert len({str(h.FrameOfReferenceUID) for h in s.headers if "FrameOfReferenceUID" in h}) <= 1


# -- on disk: reading back, and the intake ------------------------------------------------------
def _tiny_ct(ds: Dataset, series_uid: str, rng: np.random.Generator) -> Dataset:
    """A header from perturbed_series made into a complete little CT instance."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = series_uid, "1.2.3.4", "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:  # noqa: BLE001 - the perturbation broke them; any pixel count will do
        rows = cols = 4
    rows, cols = max(1, min(rows, 16)), max(1, min(cols, 16))
    ds.PixelData = rng.integers(0, 4096, rows * cols, dtype=np.uint16).tobytes()
    return ds


@st.composite
def spooled_files(draw: st.DrawFn) -> list[bytes]:
    """Part-10 files of a perturbed series, some then cut, flipped or replaced by noise."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    uid = "1.2.826.0.1.3680043.10.9.4"
    files = []
    items = draw(perturbed_series())
    short = draw(st.sets(st.integers(0, max(0, len(items) - 1)), max_size=1))  # Pixel Data shorter than declared
    for k, (_, ds) in enumerate(items):
        ds = _tiny_ct(ds, uid, rng)
        if k in short:
            ds.PixelData = ds.PixelData[:len(ds.PixelData) // 4 * 2]
        buf = io.BytesIO()
        try:
            ds.save_as(buf, enforce_file_format=True)
        except Exception:  # noqa: BLE001 - pydicom refuses to write some of the noise; a sender would too
            continue
        files.append(buf.getvalue())
    for op in draw(st.lists(st.sampled_from(["cut", "flip", "noise"]), max_size=2)):
        if not files:
            break
        i = draw(st.integers(0, len(files) - 1))
        data = files[i]
        at = draw(st.integers(132, max(132, len(data) - 1)))
        if op == "cut":
            files[i] = data[:at]
        elif op == "flip" and at < len(data):
            files[i] = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        elif op == "noise":
            files[i] = data[:132] + rng.bytes(draw(st.integers(0, 400)))
    return files


DOCUMENTED = {SUCCESS, DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND, DUPLICATE_SOP_INSTANCE}


@DISK
@given(files=spooled_files())
def test_intake_and_assembly_survive_anything(files: list[bytes]) -> None:
    """Every instance gets a documented status (refused ones land in the quarantine with a reason),
    and whatever was stored reads back into volumes of the declared shape, or a SeriesError."""
    with tempfile.TemporaryDirectory() as tmp:
        parts = Parts(Path(tmp))
        try:
            intake: Intake = parts.intake
            refused = 0
            for data in files:
                try:
                    ds = pydicom.dcmread(io.BytesIO(data))
                except Exception:  # noqa: BLE001 - a receiver never gets that far: nothing to hand in
                    continue
                result = intake.accept(data, ds, "dimse")
                assert result.status in DOCUMENTED, result
                refused += result.status != SUCCESS
                assert result.status == SUCCESS or result.reason
            notes = list((parts.spool.root / "quarantine").rglob("*.json"))
            assert len(notes) == refused
            series, _ = read_ct_series([parts.spool.root / "series"])
            for s in series:
                try:
                    vol = load_hu(s)
                except SeriesError:
                    continue
                first = s.headers[0]
                assert vol.shape == (len(s.files), int(first.Rows), int(first.Columns))
                assert np.all(np.isfinite(vol))
        finally:
            parts.store.close()
