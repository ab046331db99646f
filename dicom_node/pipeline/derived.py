"""The derived "CALCIUM REMOVED" CT series, as classic single-frame CT images.

Every viewer shows classic CT Image Storage, so the radiologist can open the derived
series beside the original with the same hanging protocol. highdicom does not build
classic CT images, so they are written with pydicom from the source slices: same
patient, study, frame of reference, geometry and rescale, so the two series overlay
exactly. The derived series says what it is: DERIVED image type, a description, the
derivation code, the contributing equipment and a reference to every source image.

UIDs are deterministic in the source instance and the model, so re-sending the same
series never creates a second derived series in the archive.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import VR

from dicom_node import __version__
from dicom_node.pipeline.series import MANUFACTURER, PIXEL_DATA, Series, sop_class

DERIVATION_CODE = Code("113077", "DCM", "Volume editing")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
SUFFIX = " CALCIUM REMOVED"
UNPAIRED_BODY_PARTS = {"HEART", "CHEST", "THORAX", "ABDOMEN", "PELVIS", "CHESTABDOMEN", "CHESTABDPELVIS",
                       "ABDOMENPELVIS", "WHOLEBODY", "HEAD", "NECK", "HEADNECK", "SPINE", "CSPINE", "TSPINE",
                       "LSPINE", "AORTA", "CORONARYARTERY", "MEDIASTINUM"}


@dataclass
class DerivedOptions:
    series_number_offset: int = 1000
    institution_name: str | None = None
    station_name: str | None = None


UID_NAMESPACE = uuid.UUID("5b0d3c1e-6a7f-5e0b-9f5c-64d1c0a1e0de")  # dicom-node's, fixed forever


def derived_uid(*parts: str) -> str:
    """A UID that depends only on its inputs, for idempotent re-processing.

    A name-based (version 5) UUID in the 2.25 arc (ITU-T X.667). pydicom's
    ``generate_uid(prefix=None, entropy_srcs=...)`` would ignore the sources and
    return a random UUID, which is exactly what we must not do here.
    """
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join([MANUFACTURER, *parts])).int}"


def instance_uid(ds: Dataset) -> str:
    return str(getattr(ds, "SOPInstanceUID", "") or getattr(getattr(ds, "file_meta", None),
                                                             "MediaStorageSOPInstanceUID", "") or "")


def source_uids(series: Series, model_id: str) -> dict[str, str]:
    """Study/series/frame UIDs for outputs; stand-ins where an anonymiser blanked the source's."""
    first = series.headers[0]
    study = str(getattr(first, "StudyInstanceUID", "") or "") or derived_uid("study", series.uid)
    frame = str(getattr(first, "FrameOfReferenceUID", "") or "") or derived_uid("frame", series.uid)
    return {"study": study, "frame": frame, "series": derived_uid("ct", series.uid, model_id),
            "seg_series": derived_uid("seg", series.uid, model_id), "seg": derived_uid("seg-sop", series.uid, model_id),
            "multiframe_series": derived_uid("ct-multiframe", series.uid, model_id),
            "multiframe": derived_uid("ct-multiframe-sop", series.uid, model_id),
            "sr_series": derived_uid("sr", series.uid, model_id), "sr": derived_uid("sr-sop", series.uid, model_id)}


def contributing_equipment(model_id: str, description: str) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name="dicom-node calcium removal", software_versions=[__version__, model_id[:64]],
        contribution_datetime=dt.datetime.now(), contribution_description=description[:1024])


def _stored(hu: np.ndarray, ds: Dataset) -> np.ndarray:
    """HU back to the source's stored values, clipped to what its pixel format can hold."""
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    lo, hi = _stored_range(int(ds.BitsStored), int(ds.PixelRepresentation))
    return np.clip(np.round((hu - intercept) / slope), lo, hi)


def _stored_range(bits: int, pixel_representation: int) -> tuple[int, int]:
    """The smallest and largest stored value BitsStored holds, signed (PixelRepresentation 1) or not."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if pixel_representation == 1 else (0, (1 << bits) - 1)


# Transfer syntaxes whose Pixel Data is the stored values as little-endian words, nothing around them.
NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
VERBATIM_MAX_BYTES = 1024  # longer values are rare and rarely repeat: converted as they always were
SEEN_ONCE = "seen once"  # a header value not yet checked (a value unique to one slice never is)


@dataclass
class SliceShared:
    """What every slice of one derived series shares, made once per series instead of once per slice.

    ``now``: the series' date and time (one series, one SeriesDate/SeriesTime). ``equipment``: this
    node's ContributingEquipment item. ``verbatim``: what ``_remove_private_tags`` learnt about the
    source's header values, (tag, VR, raw value, character set) -> whether writing the value as read
    gives the same bytes as converting it and writing it back, or SEEN_ONCE.
    """

    now: dt.datetime
    equipment: Dataset
    verbatim: dict[tuple, bool | str] = field(default_factory=dict)


def _encoded_pixels(src: Dataset) -> bytes | None:
    """The source's Pixel Data as it is encoded, where that is byte for byte what decoding it and writing
    the decoded array back (``src.pixel_array.tobytes()``) gives; None where it may not be.

    Most slices of a result are unchanged; decoding them only to write the same words again was a tenth
    of the write stage. Only one frame of 16-bit, one-sample words in a native little-endian transfer
    syntax, exactly as long as Rows x Columns says, qualifies. A big-endian, compressed or longer (padded)
    value takes the decode path as before, and so does a value with bits set above BitsStored that are
    not copies of the sign bit: pydicom's decoder clears (or sign-extends) those unused bits.
    """
    meta = getattr(src, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in NATIVE_LITTLE_ENDIAN:
        return None
    try:
        if (int(src.BitsAllocated) != 16 or int(src.SamplesPerPixel) != 1
                or int(src.get("NumberOfFrames", 1) or 1) != 1):
            return None
        rows, cols, bits, signed = int(src.Rows), int(src.Columns), int(src.BitsStored), int(src.PixelRepresentation)
        data = src.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):  # the decode path says what is wrong
        return None
    if not isinstance(data, bytes) or len(data) != rows * cols * 2 or not 1 <= bits <= 16 or signed not in (0, 1):
        return None
    if bits < 16:  # every value must lie in what BitsStored holds; min and max read the words once, in place
        words = np.frombuffer(data, "<i2" if signed else "<u2")
        lo, hi = _stored_range(bits, signed)
        if words.min() < lo or words.max() > hi:
            return None
    return data


def _element_bytes(elem: DataElement | RawDataElement, encodings: str | list[str]) -> bytes:
    """One element as ``save_as`` writes it into an explicit VR little endian data set."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _remove_private_tags(ds: Dataset, verbatim: dict[tuple, bool | str] | None) -> None:
    """``ds.remove_private_tags()``, without converting the header values that need no converting.

    ``remove_private_tags`` converts every element it passes, so the file is written from values,
    re-encoded: converting some fifty elements per slice was an eighth of the write stage, and a value
    takes longer to write than the bytes it was read from. Most of them (patient, study, geometry,
    rescale) are the same in every slice of a series. An element of an explicit VR little endian source
    is therefore converted as before the first time a value is seen; the second time, both ways of
    writing it are compared, and from then on a value that pydicom writes back byte for byte as read is
    left as read. The file is the same either way. Anything else is converted as before: sequences,
    implicit VR or big-endian sources (written explicit little endian, they are re-encoded anyway), UN
    (the VR it converts to can depend on other elements) and long values.
    """
    if verbatim is None or ds.original_encoding != (False, True):
        ds.remove_private_tags()
        return
    encodings = ds.get("SpecificCharacterSet", default_encoding)  # what write_dataset encodes text with
    charset = str(encodings)
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if tag.is_private:
            del ds[tag]
            continue
        if (elem.is_raw and elem.VR not in (None, VR.SQ, VR.UN) and elem.length != 0xFFFFFFFF
                and tag != PIXEL_DATA and len(elem.value or b"") <= VERBATIM_MAX_BYTES):
            key = (tag, elem.VR, elem.value, charset)
            same = verbatim.get(key)
            if same is True:
                continue
            converted = ds[tag]
            if same is None:
                verbatim[key] = SEEN_ONCE
            elif same == SEEN_ONCE:
                verbatim[key] = _element_bytes(elem, encodings) == _element_bytes(converted, encodings)
            continue
        elem = ds[tag]
        if elem.VR == VR.SQ:
            for item in elem.value:
                item.remove_private_tags()


def derive_slice(src: Dataset, hu_slice: np.ndarray, changed: np.ndarray, uids: dict[str, str], model_id: str,
                 description: str, options: DerivedOptions, shared: SliceShared | None = None) -> Dataset:
    """One derived slice: the source's stored pixels, with only the changed voxels replaced.

    Takes ownership of ``src``: the derived slice is ``src`` itself, changed in place and returned (pass
    a copy to keep the source). Each source slice is read from disk for this alone, and deep-copying it
    cost more than decoding its pixels. ``shared`` is made once per series by ``write_derived_series``;
    without it, a slice of its own (its own time and equipment item, every header value converted).
    """
    if changed.any():
        pixels = src.pixel_array.copy()
        pixels[changed] = _stored(hu_slice[changed], src).astype(pixels.dtype)
        pixel_data = pixels.tobytes()
    else:
        pixel_data = _encoded_pixels(src)
        if pixel_data is None:
            pixel_data = src.pixel_array.tobytes()
    # What the derived slice takes from the source, read before the slice is changed in place.
    src_uid = instance_uid(src)
    sop_class_uid = sop_class(src)
    series_number = int(getattr(src, "SeriesNumber", 0) or 0) + options.series_number_offset
    original = str(getattr(src, "SeriesDescription", "") or "CT")
    equipment = list(getattr(src, "ContributingEquipmentSequence", []))
    ds = src
    if "ContributingEquipmentSequence" in ds:  # the source's items are written as read (private tags and
        del ds.ContributingEquipmentSequence  # all), as they were when the slice was a copy: not cleaned below
    if not ds.original_encoding[1]:  # big endian source: decode every element, then write it little endian
        for _ in ds.iterall():  # iterating converts each raw element to a value
            pass
        ds.set_original_encoding(False, True)
    # vendor tags describe the original acquisition's processing
    _remove_private_tags(ds, shared.verbatim if shared else None)
    for kw in ("ReferencedImageSequence", "IconImageSequence"):
        if kw in ds:
            del ds[kw]
    sop_uid = derived_uid("ct-sop", src_uid, model_id)
    now = shared.now if shared else dt.datetime.now()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uids["study"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = series_number
    ds.SeriesDescription = original[: 64 - len(SUFFIX)] + SUFFIX
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.DerivationDescription = description[:1024]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (DERIVATION_CODE.value, "DCM",
                                                                    DERIVATION_CODE.meaning)
    ds.DerivationCodeSequence = Sequence([code])
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = src_uid
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
        codes.DCM.SourceImageForImageProcessingOperation.value, "DCM",
        codes.DCM.SourceImageForImageProcessingOperation.meaning)
    ref.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.SourceImageSequence = Sequence([ref])
    ds.ContributingEquipmentSequence = Sequence(
        equipment + [shared.equipment if shared else contributing_equipment(model_id, description)])
    ds.BurnedInAnnotation = "NO"
    body_part = str(getattr(ds, "BodyPartExamined", "")).upper()
    if "Laterality" not in ds and "ImageLaterality" not in ds and body_part not in UNPAIRED_BODY_PARTS:
        # type 2C, required unless the part is known to be unpaired; anonymisers strip it
        ds.Laterality = ""
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OW"
    ds.BitsAllocated = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for kw in ("PlanarConfiguration", "NumberOfFrames"):
        if kw in ds:
            del ds[kw]
    return ds


def write_derived_series(series: Series, volume_hu: np.ndarray, changed: np.ndarray, out_dir: Path, model_id: str,
                         description: str, options: DerivedOptions | None = None, shared: SliceShared | None = None,
                         slices: range | None = None) -> list[Path]:
    """Write one derived slice per source slice into ``out_dir``; returns the paths.

    One slice after the other: a pool of threads was slower on two cores (pydicom's encoding holds
    the GIL, and the threads contend for it). ``slices`` (default: all) and ``shared`` let two
    processes write parts of one series: they must share one :func:`series_shared`.
    """
    opts = options or DerivedOptions()
    uids = source_uids(series, model_id)
    shared = shared or series_shared(model_id, description)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for z in slices if slices is not None else range(len(series.files)):
        ds = derive_slice(pydicom.dcmread(series.files[z]), volume_hu[z], changed[z], uids, model_id, description,
                          opts, shared)
        paths.append(save_atomic(ds, out_dir / f"CT_{ds.SOPInstanceUID}.dcm"))
    return paths


def series_shared(model_id: str, description: str) -> SliceShared:
    """What every slice of one derived series shares (its date and time, our equipment item)."""
    return SliceShared(now=dt.datetime.now(), equipment=contributing_equipment(model_id, description))


def save_atomic(ds: Dataset, path: Path) -> Path:
    """Write a Part-10 file under a temporary name, then rename: a sender never sees half a file."""
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


def write_multiframe(series: Series, derived: list[Path], out_dir: Path, model_id: str, uids: dict[str, str],
                     description: str, series_number: int) -> Path:
    """The derived series again as one Legacy Converted Enhanced CT image, in a series of its own.

    Some viewers and archives handle one multi-frame object far better than hundreds of
    slices. highdicom converts our single-frame slices; what it does not carry over, we add:
    our ContributingEquipment (which also keeps the node from routing the object back into
    processing) and the Source Image Evidence that a DERIVED enhanced image must list.
    """
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    slices = [pydicom.dcmread(p) for p in derived]
    image = LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices, series_instance_uid=uids["multiframe_series"], series_number=series_number,
        sop_instance_uid=uids["multiframe"], instance_number=1,
        contributing_equipment=[contributing_equipment(model_id, description)])
    del slices
    sources: dict[str, Dataset] = {}
    for frame in image.PerFrameFunctionalGroupsSequence:
        for derivation in getattr(frame, "DerivationImageSequence", []):
            for ref in getattr(derivation, "SourceImageSequence", []):
                item = Dataset()
                item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
                item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
                sources[str(ref.ReferencedSOPInstanceUID)] = item
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.uid
    referenced_series.ReferencedSOPSequence = Sequence(list(sources.values()))
    evidence = Dataset()
    evidence.StudyInstanceUID = uids["study"]
    evidence.ReferencedSeriesSequence = Sequence([referenced_series])
    image.SourceImageEvidenceSequence = Sequence([evidence])
    out_dir.mkdir(parents=True, exist_ok=True)
    return save_atomic(image, out_dir / f"CT_MULTIFRAME_{image.SOPInstanceUID}.dcm")
