"""Write a phantom as a CT series, like a scanner would send it.

Experiment 2, the tests and ``dicom-node demo`` all need CTA studies whose truth is
known; they go through the same DICOM path as patient data, so nothing about the
phantom can short-cut the reader, the engine or the writer.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node import __version__
from dicom_node_lab.phantom import Phantom

RESCALE_INTERCEPT = -1024.0


def stored_values(volume_hu: np.ndarray) -> np.ndarray:
    """HU as the phantom's 12-bit slices store them; Experiment 2 reproduces the rounding in-process."""
    return np.clip(np.round(volume_hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)


def ct_series(volume_hu: np.ndarray, spacing: tuple[float, float, float], *, patient_id: str = "PHANTOM-0001",
              patient_name: str = "Phantom^Coronary", study_uid: str | None = None, series_uid: str | None = None,
              description: str = "CTA Coronary 0.47 phantom", series_number: int = 3,
              origin_mm: tuple[float, float, float] = (-60.0, -60.0, -100.0)) -> list[Dataset]:
    """Single-frame CT Image Storage datasets, one per z slice, stored as uint16 with intercept -1024."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    now = dt.datetime.now()
    stored = stored_values(volume_hu)
    out = []
    for z in range(volume_hu.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.StudyDescription = "CT coronary angiography (synthetic phantom)"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.BodyPartExamined = "HEART"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "dicom-node phantom"
        ds.ManufacturerModelName = "coronary CTA phantom"
        ds.SoftwareVersions = __version__
        ds.InstanceNumber = z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.KVP = "100"
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(origin_mm[0], 4), round(origin_mm[1], 4),
                                   round(origin_mm[2] + z * spacing[0], 4)]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelSpacing = [round(spacing[1], 6), round(spacing[2], 6)]
        ds.SliceThickness = round(spacing[0], 6)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume_hu.shape[1], volume_hu.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = int(RESCALE_INTERCEPT)
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 300
        ds.WindowWidth = 1200
        ds.PixelData = stored[z].tobytes()
        out.append(ds)
    return out


def write_phantom_series(p: Phantom, folder: Path, **kwargs) -> list[Path]:
    """Write the phantom's acquired image (with calcium) as a CT series into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in ct_series(p.image, p.spacing, **kwargs):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
