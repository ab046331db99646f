"""The bad-input corpus, made by the tests themselves, and the outcome the node documents for each.

docs/bad-input.md's table is rendered from CASES (``python -m tests.node.badinput`` rewrites it, and
tests/test_bad_input.py fails when it is stale), so the documentation says exactly what is tested.
Everything is small (24 slices of 48x48) so the whole corpus is rebuilt in a few seconds.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import random
import shutil
import struct
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    BasicTextSRStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14

from dicom_node_lab import phantom
from dicom_node_lab.phantom_dicom import ct_series

SHAPE = (24, 48, 48)
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "bad-input.md"
TABLE_START = "<!-- bad-input table: start (python -m tests.node.badinput) -->"
TABLE_END = "<!-- bad-input table: end -->"
STATUS_NAMES = {0x0000: "Success", 0xA900: "Data set does not match SOP class", 0xC000: "Cannot understand",
                0x0111: "Duplicate SOP instance"}


@dataclass(frozen=True)
class Case:
    """One bad input and what the node does with it; ``reason`` is a phrase the tests find in its answer."""

    name: str
    what: str
    kind: str  # instance: refused on arrival | series: the job decides | stored: no job | body: the STOW request
    reason: str
    status: int = 0x0000  # C-STORE status, and STOW-RS's Failure Reason for the part
    http: int = 200  # STOW-RS answer when this is the only thing sent
    job: str | None = None  # the state the series' job ends in; None: no job
    ts: str = ""  # transfer syntax the instances travel in, when it matters

    def answer(self) -> str:
        if self.kind == "instance":
            return (f"C-STORE 0x{self.status:04X} ({STATUS_NAMES[self.status]}); STOW-RS {self.http}, "
                    f"Failure Reason 0x{self.status:04X}")
        if self.kind == "body":
            return f"HTTP {self.http}" + (f", Failure Reason 0x{self.status:04X}" if self.status else "")
        if self.kind == "stored":
            return "stored (0x0000 / 200), no job"
        return f"stored (0x0000 / 200), job {self.job}"

    def kept(self) -> str:
        if self.kind == "instance" or (self.kind == "body" and self.status):
            where = "unreadable" if self.name in UNREADABLE else "<series>"
            return f"`quarantine/refused/{where}/` + `.json`"
        if self.kind == "body":
            return "nothing (the client keeps it)"
        if self.kind == "series" and self.job == "failed":
            return "`series/<uid>/` + `quarantine/job-<id>/REASON.json`"
        if self.kind == "series":
            return "`series/<uid>/`, outputs in `out/<job>/`"
        return "`series/<uid>/`"


# Refused before their series is trusted: kept under quarantine/refused/unreadable/.
UNREADABLE = {"not_dicom", "wrong_part_type", "text_part", "uid_too_long", "uid_non_ascii", "uid_empty_component",
              "deep_nesting", "deep_nesting_undefined", "huge_element"}


def nested_sequence(depth: int, undefined: bool = False) -> bytes:
    """ContentSequence nested ``depth`` deep in explicit VR little endian, with explicit lengths (or
    undefined ones and delimiters), as raw bytes: pydicom itself cannot write it (it recurses, and runs
    away in memory at such depths)."""
    payload = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"X "
    for _ in range(depth):
        if undefined:
            item = (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + payload
                    + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
            payload = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + item
                       + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(payload)) + payload
            payload = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    return payload


def _before_pixels(data: bytes, element: bytes) -> bytes:
    """Raw element bytes put in just before Pixel Data (explicit VR little endian)."""
    at = data.rindex(b"\xe0\x7f\x10\x00OW")
    return data[:at] + element + data[at:]


# name, what, transfer syntax, how it is made (pydicom's encoders, else DCMTK's tools)
COMPRESSED = [
    ("jpeg_lossless_sv1", "JPEG Lossless SV1 (DCMTK dcmcjpeg)", JPEGLosslessSV1, ["dcmcjpeg", "+e1"]),
    ("jpeg_lossless_p14", "JPEG Lossless, Process 14 (dcmcjpeg)", JPEGLosslessP14, ["dcmcjpeg", "+el"]),
    ("jpeg_extended", "JPEG Extended 12-bit, lossy (dcmcjpeg)", JPEGExtended12Bit, ["dcmcjpeg", "+ee"]),
    ("jpeg_ls_lossless", "JPEG-LS lossless (pyjpegls)", JPEGLSLossless, []),
    ("jpeg_ls_near", "JPEG-LS near-lossless, error 2 (pyjpegls)", JPEGLSNearLossless, []),
    ("j2k_lossless", "JPEG 2000 lossless (openjpeg)", JPEG2000Lossless, []),
    ("j2k_lossy", "JPEG 2000 lossy, ratio 5 (openjpeg)", JPEG2000, []),
    ("rle", "RLE Lossless (pydicom)", RLELossless, []),
    ("deflated", "Deflated Explicit VR Little Endian", DeflatedExplicitVRLittleEndian, []),
    ("big_endian", "Explicit VR Big Endian (dcmconv)", ExplicitVRBigEndian, ["dcmconv", "+tb"]),
    ("implicit", "Implicit VR Little Endian", ImplicitVRLittleEndian, []),
]
LOSSLESS = {JPEGLosslessSV1, JPEGLosslessP14, JPEGLSLossless, JPEG2000Lossless, RLELossless,
            DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian}

CASES: list[Case] = [
    # refused on arrival: the sender sees the failure for that instance, the rest of its series goes on
    Case("truncated_pixels", "a file cut off inside its Pixel Data", "instance", "truncated: element (7FE0,0010)",
         0xC000, 409),
    Case("truncated_header", "a file cut off inside its header (before Rows)", "instance", "Rows is missing",
         0xA900, 409),
    Case("not_dicom", "not DICOM: valid file meta, then noise", "instance", "not a DICOM", 0xC000, 409),
    Case("no_pixel_data", "a CT image without Pixel Data", "instance", "no Pixel Data", 0xA900, 409),
    Case("bits_allocated", "BitsAllocated 8 on 16-bit pixels", "instance", "BitsAllocated 8", 0xA900, 409),
    Case("huge_size", "Rows and Columns 65535 with 2 KiB of Pixel Data", "instance",
         "declared size 65535x65535", 0xA900, 409),
    Case("jpeg_baseline", "JPEG Baseline (8-bit, made by dcmcjpeg)", "instance", "BitsAllocated 8", 0xA900, 409,
         ts=JPEGBaseline8Bit),
    Case("pixel_data_long", "Pixel Data 4 bytes longer than Rows × Columns × 2", "instance", "need exactly",
         0xA900, 409),
    Case("rgb_one_sample", "PhotometricInterpretation RGB on one sample per pixel", "instance",
         "PhotometricInterpretation RGB", 0xA900, 409),
    Case("palette_color", "PhotometricInterpretation PALETTE COLOR", "instance",
         "PhotometricInterpretation PALETTE COLOR", 0xA900, 409),
    Case("uid_too_long", "a Series Instance UID of 4,999 characters", "instance", "characters long", 0xA900, 409),
    Case("uid_non_ascii", "a Study Instance UID with a non-ASCII byte", "instance", "non-ASCII", 0xA900, 409),
    Case("uid_empty_component", "a SOP Instance UID with an empty component (1.2..3)", "instance",
         "is not a valid DICOM UID", 0xA900, 409),
    Case("deep_nesting", "one sequence nested 300 deep, explicit lengths (the probe's poison slice)", "instance",
         "nested more than 32 levels", 0xC000, 409),
    Case("deep_nesting_undefined", "one sequence nested 300 deep, undefined lengths", "instance",
         "RecursionError", 0xC000, 409),
    Case("huge_element", "a 17 MB private element in the header", "instance", "more than the 16777216 accepted",
         0xC000, 409),
    Case("sop_in_two_series", "a SOP Instance UID received before in another series", "instance",
         "in another series", 0x0111, 409),
    Case("duplicate_sop", "a SOP Instance UID sent again with other content (an identical re-send is fine)",
         "instance", "received before with different content", 0x0111, 409),
    # stored, then the series' job fails with the reason, and its input goes to quarantine/job-<id>/
    Case("rows_columns", "one slice 48x40 in a 48x48 series", "series", "slices have different sizes",
         job="failed"),
    Case("missing_slice", "a slice missing from the middle", "series", "missing slices", job="failed"),
    Case("uneven_spacing", "one slice 0.15 mm off its place (0.47 mm spacing)", "series", "uneven slice spacing",
         job="failed"),
    Case("gantry_tilt", "slices sheared by a 10° gantry tilt", "series", "gantry tilt", job="failed"),
    Case("one_slice", "a series of one slice", "series", "a single slice is not a volume", job="failed"),
    Case("mixed_frames", "two acquisitions under one Series Instance UID (two frames of reference)", "series",
         "frames of reference (mixed acquisitions)", job="failed"),
    Case("same_positions", "two reconstructions under one Series Instance UID (same positions)", "series",
         "two slices share a position", job="failed"),
    Case("enhanced_ct", "an Enhanced CT Image Storage (multi-frame) instance", "series",
         "Enhanced CT Image Storage (multi-frame) is not supported", job="failed"),
    Case("corrupt_codestream", "a JPEG-LS slice whose codestream is noise", "series", "cannot be decoded",
         job="failed", ts=JPEGLSLossless),
    # processed: what we accept must work, whatever route and encoding it took
    Case("two_series", "two series in one association", "series", "processed", job="done"),
    *[Case(name, what, "series", "processed", job="done", ts=ts) for name, what, ts, _ in COMPRESSED],
    # stored, no job: a PACS that routes a whole study must not see failures for its reports
    Case("sr", "a Basic Text SR", "stored", "not a CT image"),
    Case("pr", "a Grayscale Softcopy Presentation State", "stored", "not a CT image"),
    Case("mr", "an MR image", "stored", "not a CT image"),
    # STOW-RS requests that are not well-formed: nothing is stored
    Case("no_boundary", "multipart/related without a boundary", "body", "no boundary", http=400),
    Case("no_blank_line", "a part without CRLF CRLF after its headers", "body", "no blank line", http=400),
    Case("truncated_body", "a body cut off before the closing delimiter", "body", "truncated", http=400),
    Case("wrong_part_type", "a part of type text/plain", "body", "is not application/dicom", 0xC000, 409),
    Case("text_part", "a part of type application/dicom that holds text", "body", "not a DICOM file", 0xC000,
         409),
    Case("wrong_type", 'type="application/dicom+json" on the request', "body", 'only type="application/dicom"',
         http=415),
    Case("not_multipart", "a request that is not multipart/related", "body", "expected multipart/related",
         http=415),
]
BY_NAME = {c.name: c for c in CASES}


def outcome_table() -> str:
    """The Markdown table docs/bad-input.md shows, rendered from CASES."""
    rows = ["| Input | Answer | Reason (phrase the tests check) | Received bytes end up in |",
            "| --- | --- | --- | --- |"]
    for c in CASES:
        reason = c.reason.replace("|", "\\|")
        rows.append(f"| {c.what} | {c.answer()} | {reason} | {c.kept()} |")
    return "\n".join(rows)


# -- making the inputs ------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _volume(seed: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    opts = phantom.PhantomOptions(n_vessels=(1, 1), calcified_probability=1.0, bone_probability=0.0)
    p = phantom.generate(SHAPE, seed=seed, options=opts)
    return p.image, p.spacing


def good_series(seed: int = 2, **kwargs: object) -> list[Dataset]:
    """A valid phantom CT series with fresh UIDs (each call is a new series); seed 2 has calcium."""
    image, spacing = _volume(seed)
    return ct_series(image, spacing, description=f"bad-input corpus seed {seed}", **kwargs)  # type: ignore[arg-type]


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dataset_offset(data: bytes) -> int:
    """Where the data set starts, past preamble and file meta."""
    return 132 + 12 + int.from_bytes(data[140:144], "little")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        import pytest
        pytest.skip(f"{name} not installed (DCMTK; .ci/run installs it)")
    return path


def dcmtk(args: list[str], ds: Dataset, tmp: Path) -> Dataset:
    """Run a DCMTK converter (dcmcjpeg, dcmconv) on one data set.

    dcmcjpeg marks lossy output DERIVED with a new UID; a PACS that compresses keeps ORIGINAL, so the
    corpus undoes that: these cases test the decoding, not the image-type policy (tests/test_series.py).
    """
    src, dst = tmp / f"{ds.SOPInstanceUID}.in.dcm", tmp / f"{ds.SOPInstanceUID}.out.dcm"
    ds.save_as(src, enforce_file_format=True)
    keep_uid = ["+un"] if args[0] == "dcmcjpeg" else []
    out = subprocess.run([need_tool(args[0]), *args[1:], *keep_uid, str(src), str(dst)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    back = pydicom.dcmread(dst)
    back.ImageType = ["ORIGINAL", *list(back.ImageType)[1:]]
    src.unlink()
    dst.unlink()
    return back


def encode(ds: Dataset, ts: str, tmp: Path) -> Dataset:
    """The same data set in another transfer syntax, by whichever encoder can make it."""
    tool = next((t for _, _, uid, t in COMPRESSED if uid == ts), [])
    if ts == JPEGBaseline8Bit:
        tool = ["dcmcjpeg", "+eb"]
    if tool:
        return dcmtk(tool, ds, tmp)
    out = copy.deepcopy(ds)
    if ts in (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = UID(ts)
    elif ts == JPEGLSNearLossless:
        out.compress(ts, jls_error=2)
    elif ts == JPEG2000:
        out.compress(ts, j2k_cr=[5])
    else:
        out.compress(ts)
    return out


def instance_case(name: str, tmp: Path) -> list[bytes]:
    """The Part-10 files of an instance-level case, in sending order (one new series per call)."""
    s = good_series()
    ds = s[0]
    if name == "truncated_pixels":
        return [part10(ds)[:-500]]
    if name == "truncated_header":
        data = part10(ds)
        at = data.index(b"\x28\x00\x10\x00US", dataset_offset(data))  # (0028,0010) Rows, explicit VR
        return [data[:at + 3]]
    if name == "not_dicom":
        data = part10(ds)
        noise = random.Random(6).randbytes(3000)
        return [data[:dataset_offset(data)] + noise]
    if name == "no_pixel_data":
        del ds.PixelData
        return [part10(ds)]
    if name == "bits_allocated":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        return [part10(ds)]
    if name == "huge_size":
        ds.Rows = ds.Columns = 65535
        ds.PixelData = bytes(2048)
        return [part10(ds)]
    if name == "jpeg_baseline":
        return [part10(encode(ds, JPEGBaseline8Bit, tmp))]
    if name == "pixel_data_long":
        ds.PixelData = ds.PixelData + bytes(4)
        return [part10(ds)]
    if name in ("rgb_one_sample", "palette_color"):
        ds.PhotometricInterpretation = "RGB" if name == "rgb_one_sample" else "PALETTE COLOR"
        return [part10(ds)]
    if name.startswith("uid_"):
        with warnings.catch_warnings():  # pydicom warns about the very UIDs we make
            warnings.simplefilter("ignore")
            if name == "uid_too_long":
                ds.SeriesInstanceUID = "1." * 2499 + "1"
            elif name == "uid_non_ascii":
                ds.StudyInstanceUID = "1.2.\u00e4.3"
            else:
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2..3"
            return [part10(ds)]
    if name == "deep_nesting":
        return [_before_pixels(part10(ds), nested_sequence(300))]
    if name == "deep_nesting_undefined":
        return [_before_pixels(part10(ds), nested_sequence(300, undefined=True))]
    if name == "huge_element":  # a private creator and a 17 MB OB under it (out of tag order: nobody checks)
        private = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"BADINPUT"
        private += struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, 17 << 20) + bytes(17 << 20)
        return [_before_pixels(part10(ds), private)]
    if name == "sop_in_two_series":
        other = copy.deepcopy(s[1])
        other.SeriesInstanceUID = generate_uid()
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return [part10(ds), part10(other)]
    if name == "duplicate_sop":
        other = copy.deepcopy(s[1])
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return [part10(ds), part10(ds), part10(other)]  # first, identical re-send, conflicting copy
    raise KeyError(name)


def _enhanced_ct(s: list[Dataset]) -> Dataset:
    """The series as one Enhanced CT Image Storage instance (the functional groups a reader needs)."""
    first = s[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "Modality", "SeriesInstanceUID",
               "SeriesNumber", "SeriesDescription", "FrameOfReferenceUID", "PositionReferenceIndicator",
               "Manufacturer", "ContentDate", "ContentTime", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
               "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, kw, getattr(first, kw))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(s)
    measures, orientation, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, first.SliceThickness
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = -1024, 1, "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for sl in s:
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = sl.ImagePositionPatient
        frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(sl.PixelData for sl in s)
    return ds


def series_case(name: str, tmp: Path) -> list[Dataset]:
    """The instances of a series-level case (one new Series Instance UID per call, except as the case says)."""
    if name == "two_series":
        return good_series(2) + good_series(3)
    for case_name, _, ts, _ in COMPRESSED:
        if name == case_name:
            return [encode(ds, ts, tmp) for ds in good_series()]
    s = good_series()
    dz = float(s[0].SliceThickness)
    if name == "rows_columns":
        odd = s[5]
        odd.PixelData = odd.pixel_array[:, :40].copy().tobytes()
        odd.Columns = 40
        return s
    if name == "missing_slice":
        return s[:12] + s[13:]
    if name == "uneven_spacing":
        s[12].ImagePositionPatient = [*s[12].ImagePositionPatient[:2], s[12].ImagePositionPatient[2] + 0.15]
        return s
    if name == "gantry_tilt":
        shear = math.tan(math.radians(10)) * dz
        for i, ds in enumerate(s):
            x, y, z = ds.ImagePositionPatient
            ds.ImagePositionPatient = [x, round(y + i * shear, 4), z]
        return s
    if name == "one_slice":
        return s[:1]
    if name in ("mixed_frames", "same_positions"):
        shift = dz / 2 if name == "mixed_frames" else 0.0
        other = good_series(3, series_uid=s[0].SeriesInstanceUID, study_uid=s[0].StudyInstanceUID,
                            origin_mm=(-60.0, -60.0, -100.0 + shift))
        if name == "same_positions":
            for ds in other:
                ds.FrameOfReferenceUID = s[0].FrameOfReferenceUID
        return s + other
    if name == "enhanced_ct":
        return [_enhanced_ct(s)]
    if name == "corrupt_codestream":
        out = [encode(ds, JPEGLSLossless, tmp) for ds in s]
        # Noise, not a cut: libjpeg decodes a JPEG-LS stream cut short into wrong pixels without a word.
        size = len(next(generate_frames(out[7].PixelData, number_of_frames=1)))
        out[7].PixelData = encapsulate([random.Random(7).randbytes(size // 2 * 2)])
        return out
    raise KeyError(name)


def stored_case(name: str) -> Dataset:
    """A non-CT object of the study (SR, PR, MR), which the node stores and does not process."""
    ct = good_series()[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, kw, getattr(ct, kw))
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 90
    ds.InstanceNumber = 1
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if name == "sr":
        ds.SOPClassUID, ds.Modality = BasicTextSRStorage, "SR"
        ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        ds.ContinuityOfContent = "SEPARATE"
        title = Dataset()
        title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic report"
        ds.ConceptNameCodeSequence = Sequence([title])
    elif name == "pr":
        ds.SOPClassUID, ds.Modality = GrayscaleSoftcopyPresentationStateStorage, "PR"
        ds.ContentLabel, ds.PresentationLUTShape = "BADINPUT", "IDENTITY"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ct.SOPClassUID, ct.SOPInstanceUID
        series = Dataset()
        series.SeriesInstanceUID = ct.SeriesInstanceUID
        series.ReferencedImageSequence = Sequence([ref])
        ds.ReferencedSeriesSequence = Sequence([series])
    elif name == "mr":
        ds = copy.deepcopy(ct)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.Modality = "MR"
        for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
            delattr(ds, kw)
        return ds
    else:
        raise KeyError(name)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def multipart(parts: list[bytes], boundary: str = "badinput-boundary", part_type: str = "application/dicom",
              ) -> tuple[bytes, str]:
    """A well-formed STOW-RS body and its Content-Type."""
    b = boundary.encode()
    body = b"".join(b"--" + b + f"\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + b"--" + b + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={boundary}'


def body_case(name: str, good: bytes) -> tuple[bytes, str]:
    """A STOW-RS request body and Content-Type for a body-level case, built around one good instance."""
    body, ctype = multipart([good])
    if name == "no_boundary":
        return body, 'multipart/related; type="application/dicom"'
    if name == "no_blank_line":
        return body.replace(b"application/dicom\r\n\r\n", b"application/dicom\r\n", 1), ctype
    if name == "truncated_body":
        return body[:len(body) // 2], ctype
    if name == "wrong_part_type":
        return multipart([good], part_type="text/plain")
    if name == "text_part":
        return multipart([b"Dear PACS, this is not an image.\r\n" * 20])
    if name == "wrong_type":
        return body, ctype.replace('type="application/dicom"', 'type="application/dicom+json"')
    if name == "not_multipart":
        return good, "application/dicom"
    raise KeyError(name)


def write_table(doc: Path = DOC) -> bool:
    """Put the current table into the doc between its markers; True when it changed."""
    text = doc.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    new = f"{head}{TABLE_START}\n{outcome_table()}\n{TABLE_END}{tail}"
    if new != text:
        doc.write_text(new)
    return new != text


if __name__ == "__main__":
    print("docs/bad-input.md " + ("updated" if write_table() else "already current"), file=sys.stderr)
