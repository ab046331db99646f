"""`dicom-node process` end to end: phantom CTA in, derived CT series and SEG out, checked.

Runs the shipped ONNX model on a real DICOM series written to disk, validates every
object written with dciodvfy, and checks the clinical-honesty attributes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.cli import main
from dicom_node.pipeline.derived import MANUFACTURER
from dicom_node.pipeline.morphology import dilate_mm
from dicom_node_lab import phantom
from dicom_node_lab.phantom_dicom import write_phantom_series

from ..conftest import SHARED_DATA

pytestmark = pytest.mark.slow


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not installed (apt-get install dicom3tools; .ci/run does this)")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    root = tmp_path_factory.mktemp("process")
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                  lesion_margin_mm=5.0)
    p = phantom.generate((48, 96, 96), seed=31, options=opts)
    src = write_phantom_series(p, root / "in" / "nested" / "series")
    (root / "in" / "notes.txt").write_text("not DICOM")
    rc = main(["process", str(root / "in"), str(root / "out"), "--quiet"])
    return rc, root, p, src


def test_exit_code_and_outputs(processed):
    rc, root, _, src = processed
    assert rc == 0
    outs = sorted((root / "out").rglob("*.dcm"))
    cts = [f for f in outs if f.name.startswith("CT_")]
    segs = [f for f in outs if f.name.startswith("SEG_")]
    assert len(cts) == len(src) and len(segs) == 1


def test_every_object_passes_dciodvfy(processed):
    _, root, _, _ = processed
    for f in sorted((root / "out").rglob("*.dcm")):
        assert _dciodvfy_errors(f) == [], f.name


def test_derived_series_says_what_it_is_and_keeps_everything_else(processed):
    _, root, p, src = processed
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in src}
    cts = [pydicom.dcmread(f) for f in (root / "out").rglob("CT_*.dcm")]
    series_uids = {d.SeriesInstanceUID for d in cts}
    assert len(series_uids) == 1
    changed = []
    for d in cts:
        s = sources[d.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert list(d.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert d.SeriesDescription.endswith("CALCIUM REMOVED")
        assert d.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert d.DerivationCodeSequence[0].CodeValue == "113077"
        assert d.DerivationDescription
        assert any(e.Manufacturer == MANUFACTURER for e in d.ContributingEquipmentSequence)
        for kw in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient",
                   "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept", "Rows"):
            assert d.get(kw) == s.get(kw), kw
        assert d.SeriesInstanceUID != s.SeriesInstanceUID and d.SOPInstanceUID != s.SOPInstanceUID
        assert d.SeriesNumber == s.SeriesNumber + 1000
        changed.append((float(s.ImagePositionPatient[2]), d.pixel_array.astype(float) - 1024,
                        s.pixel_array.astype(float) - 1024))
    changed.sort(key=lambda t: t[0])
    new = np.stack([c[1] for c in changed])
    old = np.stack([c[2] for c in changed])
    diff = new != old
    assert diff.any()
    # only the neighbourhood of calcium changes (0.9 mm margin), and calcium is taken out; the
    # calcium includes faint deposits the 700 HU threshold misses (the phantom's slices are in z order)
    near_calcium = dilate_mm((old > 700) | (p.calcium_fraction > 0.05), p.spacing, 1.5)
    assert not (diff & ~near_calcium).any()
    assert new[diff].mean() < old[diff].mean() - 100
    assert new[diff].max() < old[diff].max()


def test_seg_references_the_source_and_names_the_algorithm(processed):
    _, root, _, src = processed
    seg = pydicom.dcmread(next((root / "out").rglob("SEG_*.dcm")))
    src_uids = {pydicom.dcmread(f).SOPInstanceUID for f in src}
    refs = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs <= src_uids and refs
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels[:2] == ["Calcium removed", "Restored region"]
    assert labels[2:] in ([], ["Unsure restoration"]), "segment 3 only for calcium restored with doubt"
    described = seg.SegmentSequence[1].SegmentDescription
    assert described.startswith("flip disagreement HU by region: 1=") and len(described) <= 64
    assert ("!" in described) == (len(labels) == 3), "the unsure regions are the ones marked with !"
    for s in seg.SegmentSequence:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator in ("SCT", "DCM")
        assert s.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName


def test_reprocessing_gives_the_same_uids(processed, tmp_path):
    _, root, _, _ = processed
    assert main(["process", str(root / "in"), str(tmp_path), "--quiet", "--no-seg"]) == 0
    first = {f.name for f in (root / "out").rglob("CT_*.dcm")}
    again = {f.name for f in tmp_path.rglob("CT_*.dcm")}
    assert first == again, "re-sending a series must not create a second derived series"


def test_subtract_method_says_so_and_gets_its_own_uids(processed, tmp_path):
    """engine.method = "subtract": the outputs name the physics path, not the network, and its UIDs are its own."""
    _, root, _, _ = processed
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engine]\nmethod = "subtract"\n')
    assert main(["process", str(root / "in"), str(tmp_path / "out"), "--quiet", "--config", str(cfg)]) == 0
    cts = sorted((tmp_path / "out").rglob("CT_*.dcm"))
    network = {f.name for f in (root / "out").rglob("CT_*.dcm")}
    assert cts and not ({f.name for f in cts} & network), "another method's output never replaces the first"
    ct = pydicom.dcmread(cts[0])
    assert "subtracting its estimated blur" in ct.DerivationDescription and "inpainting" not in ct.DerivationDescription
    assert ct.SeriesDescription.endswith("CALCIUM REMOVED")
    seg_path = next((tmp_path / "out").rglob("SEG_*.dcm"))
    seg = pydicom.dcmread(seg_path)
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "dicom-node blur-subtraction calcium removal"
    assert seg.ContentDescription == "Calcium removed and region restored by blur subtraction"
    # no blur disagreement by default (engine.subtract_unsure_hu = 0): the regions' calibres, "!" marking the unsure
    assert seg.SegmentSequence[1].SegmentDescription.startswith("vessel calibre mm by region: ")
    assert "Scanner blur assumed: MTF50 5.2 lp/cm, edge lift 0.5 (the default)." in ct.DerivationDescription
    assert ct.DerivationDescription.endswith("Calcium estimated by the white-level rule.")
    for f in (cts[len(cts) // 2], seg_path):
        assert _dciodvfy_errors(f) == [], f.name


def test_subtract_assumes_the_blur_of_the_kernel_the_header_names(processed, tmp_path, caplog):
    """A series whose ConvolutionKernel the site's tables list gets that kernel's blur (MTF50, edge lift), and
    says so."""
    _, root, _, src = processed
    for f in src:
        ds = pydicom.dcmread(f)
        ds.ConvolutionKernel = "SOFT"
        ds.save_as(tmp_path / "in" / f.name if (tmp_path / "in").is_dir() else _mkdir(tmp_path / "in") / f.name)
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engine]\nmethod = "subtract"\n[engine.scanner_kernels]\nsoft = 3.5\n'
                   '[engine.scanner_edge_enhance]\nsoft = 0.0\n')
    with caplog.at_level("WARNING"):
        assert main(["process", str(tmp_path / "in"), str(tmp_path / "out"), "--quiet", "--config", str(cfg)]) == 0
    assert not any("not in the site's kernel tables" in r.getMessage() for r in caplog.records)
    ct = pydicom.dcmread(sorted((tmp_path / "out").rglob("CT_*.dcm"))[0])
    assert "Scanner blur assumed: MTF50 3.5 lp/cm, edge lift 0 (for kernel SOFT)." in ct.DerivationDescription
    assert ct.ConvolutionKernel == "SOFT", "the source's kernel is kept"


def test_a_kernel_the_sites_tables_do_not_list_is_logged(processed, tmp_path, caplog):
    """With kernel tables, a series of another kernel (here: none stated) gets the default blur, and the log says so."""
    _, root, _, src = processed
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engine]\nmethod = "subtract"\n[engine.scanner_kernels]\nSHARP = 6.3\n')
    with caplog.at_level("WARNING"):
        assert main(["process", *map(str, src), str(tmp_path / "out"), "--quiet", "--config", str(cfg)]) == 0
    said = [r.getMessage() for r in caplog.records if "not in the site's kernel tables" in r.getMessage()]
    assert len(said) == 1 and "kernel (not stated)" in said[0] and "MTF50 5.2 lp/cm" in said[0]
    ct = pydicom.dcmread(sorted((tmp_path / "out").rglob("CT_*.dcm"))[0])
    assert "(the default)." in ct.DerivationDescription


def test_auto_subtracts_a_measured_kernel_and_runs_the_network_for_any_other(processed, tmp_path, caplog):
    """engine.method = "auto": a series whose kernel [engine.scanner_kernels] lists is restored by the subtraction
    (and its outputs say so, with the subtraction's UIDs); the same series under an unlisted kernel by the network,
    exactly as method = "network" restores it (same UIDs, same pixels)."""
    _, root, _, src = processed
    for f in src:
        ds = pydicom.dcmread(f)
        ds.ConvolutionKernel = "SOFT"
        ds.save_as(_mkdir(tmp_path / "soft") / f.name)
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engine]\nmethod = "auto"\n[engine.scanner_kernels]\nsoft = 3.5\n')
    subtract_cfg = tmp_path / "subtract.toml"
    subtract_cfg.write_text('[engine]\nmethod = "subtract"\n[engine.scanner_kernels]\nsoft = 3.5\n')
    with caplog.at_level("INFO"):
        assert main(["process", str(tmp_path / "soft"), str(tmp_path / "auto-soft"), "--quiet", "--config",
                     str(cfg)]) == 0
        assert main(["process", *map(str, src), str(tmp_path / "auto-none"), "--quiet", "--config", str(cfg)]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("method auto")]
    assert said == ["method auto: kernel 'SOFT' is in [engine.scanner_kernels]: the subtraction",
                    "method auto: kernel (not stated) is not in [engine.scanner_kernels]: the network"]
    assert main(["process", str(tmp_path / "soft"), str(tmp_path / "subtract"), "--quiet", "--config",
                 str(subtract_cfg)]) == 0
    soft = sorted((tmp_path / "auto-soft").rglob("CT_*.dcm"))
    assert [f.name for f in soft] == [f.name for f in sorted((tmp_path / "subtract").rglob("CT_*.dcm"))]
    ct = pydicom.dcmread(soft[0])
    assert "subtracting its estimated blur" in ct.DerivationDescription
    assert "for kernel SOFT" in ct.DerivationDescription
    seg = pydicom.dcmread(next((tmp_path / "auto-soft").rglob("SEG_*.dcm")))
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == \
        "dicom-node blur-subtraction calcium removal"
    net = sorted((tmp_path / "auto-none").rglob("CT_*.dcm"))
    first = sorted((root / "out").rglob("CT_*.dcm"))
    assert [f.name for f in net] == [f.name for f in first], "the network's series keep the network's UIDs"
    a, b = pydicom.dcmread(net[len(net) // 2]), pydicom.dcmread(first[len(first) // 2])
    assert "3D inpainting" in a.DerivationDescription
    assert np.array_equal(a.pixel_array, b.pixel_array)


def test_each_lesion_says_which_learnt_estimate_restored_its_region(processed, tmp_path, capsys):
    """engine.subtract_companions with subtract_combine = "enclosed": every lesion row carries the estimate whose
    restoration its region got and the enclosure that decided it, and the series' line counts regions by estimate.
    A threshold of 0 sends every region with any enclosing calcium to the companion, 1 none."""
    from dicom_node.config import load
    from dicom_node.pipeline.process import build_engine, engine_id, process_series
    from dicom_node.pipeline.series import read_ct_series
    from tests.pipeline.test_learnt_estimate import _write

    _, _, _, src = processed
    _write(tmp_path / "plain.npz")
    _write(tmp_path / "split.npz", last=0.05)
    [series], _ = read_ct_series(src)
    rows = {}
    for share in (0.0, 1.0):
        f = tmp_path / f"c{share:g}.toml"
        f.write_text('[engine]\nmethod = "subtract"\nsubtract_estimate = "plain.npz"\n'
                     f'subtract_companions = ["split.npz"]\nsubtract_combine = "enclosed"\n'
                     f"subtract_enclosed_share = {share}\n")
        cfg = load(f)
        outcome = process_series(series, tmp_path / f"out{share:g}", cfg, build_engine(cfg, None), engine_id(cfg))
        assert outcome.status == "done" and outcome.lesion_table, outcome.reason
        rows[share] = outcome.lesion_table
        restored = [r for r in outcome.regions if r["voxels"]]
        named = "split" if share == 0.0 else "plain"
        assert restored and all(r["estimate"] == named and 0.0 < r["enclosure"] < 1.0 for r in restored)
        assert f"regions by estimate: {named} {len(restored)}" in outcome.summary()
        ct = pydicom.dcmread(next(p for p in outcome.outputs if p.name.startswith("CT_")))
        assert ct.DerivationDescription.endswith(
            f"Calcium estimated by the learnt estimate plain, and by split where the detected calcium encloses the "
            f"lumen (enclosure above {share:g}).")
    for a, b in zip(rows[0.0], rows[1.0]):
        if a["voxels"]:
            assert (a["estimate"], b["estimate"]) == ("split", "plain") and a["enclosure"] == b["enclosure"]


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_optional_multiframe_copy_is_valid_and_holds_the_same_pixels(processed, tmp_path):
    _, root, _, src = processed
    cfg = tmp_path / "multiframe.toml"
    cfg.write_text("[output]\nmultiframe = true\nwrite_seg = false\n")
    assert main(["process", str(root / "in"), str(tmp_path / "out"), "--config", str(cfg), "--quiet"]) == 0
    [mf_path] = list((tmp_path / "out").rglob("CT_MULTIFRAME_*.dcm"))
    assert _dciodvfy_errors(mf_path) == []
    mf = pydicom.dcmread(mf_path)
    assert str(mf.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2.2"  # Legacy Converted Enhanced CT Image Storage
    assert int(mf.NumberOfFrames) == len(src) and mf.ImageType[0] == "DERIVED"
    assert "CALCIUM REMOVED" in mf.SeriesDescription
    assert any(item.Manufacturer == MANUFACTURER for item in mf.ContributingEquipmentSequence)
    singles = [pydicom.dcmread(f) for f in (tmp_path / "out").rglob("CT_2*.dcm")]
    assert mf.SeriesInstanceUID not in {s.SeriesInstanceUID for s in singles}
    by_position = {round(float(s.ImagePositionPatient[2]), 3): s.pixel_array for s in singles}
    frames = mf.pixel_array
    for frame, item in zip(frames, mf.PerFrameFunctionalGroupsSequence):
        z = round(float(item.PlanePositionSequence[0].ImagePositionPatient[2]), 3)
        assert np.array_equal(frame, by_position[z])
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in src}
    evidence = mf.SourceImageEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {str(r.ReferencedSOPInstanceUID) for r in evidence} == sources


def test_our_output_is_not_processed_again(processed, tmp_path, capsys):
    _, root, _, _ = processed
    assert main(["process", str(root / "out"), str(tmp_path), "--quiet"]) == 2
    assert "our own output" in capsys.readouterr().err


def test_bad_input_exits_2_with_a_reason(tmp_path, capsys):
    assert main(["process", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["process", str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "no CT image series" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_DATA / "real-ct-siemens-j2k").is_dir(), reason="shared/data not beside checkout")
def test_real_siemens_series_is_refused_as_too_coarse(tmp_path, capsys):
    assert main(["process", str(SHARED_DATA), str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert "too coarse for coronary work" in err.out + err.err
    assert not list(tmp_path.rglob("*.dcm"))


def test_real_siemens_series_written_when_allowed_is_valid(tmp_path):
    """With the resolution guard relaxed, the J2K vendor series round-trips into valid objects."""
    if not (SHARED_DATA / "real-ct-siemens-j2k").is_dir():
        pytest.skip("shared/data not beside checkout")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[engine]\nmax_pixel_mm = 2.0\nmax_slice_mm = 3.0\n")
    few = tmp_path / "in"
    few.mkdir()
    for f in sorted((SHARED_DATA / "real-ct-siemens-j2k").iterdir())[:6]:
        shutil.copy(f, few / f.name)
    assert main(["process", str(few), str(tmp_path / "out"), "--config", str(cfg), "--quiet"]) == 0
    outs = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len([f for f in outs if f.name.startswith("CT_")]) == 6
    for f in outs[:2] + [o for o in outs if o.name.startswith("SEG_")]:
        assert _dciodvfy_errors(f) == [], f.name
    for f in outs:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    src = pydicom.dcmread(sorted(few.iterdir())[0])
    assert np.asarray(src.pixel_array).shape == (512, 512)


def test_the_forked_writer_gives_back_its_result_or_its_error() -> None:
    import errno
    import os
    import signal

    from dicom_node.pipeline.process import in_forked_process

    assert in_forked_process(lambda: {"paths": ["a", "b"], "n": 2})() == {"paths": ["a", "b"], "n": 2}
    with pytest.raises(RuntimeError, match="second writer process failed: ValueError: bad"):
        in_forked_process(lambda: (_ for _ in ()).throw(ValueError("bad")))()
    with pytest.raises(OSError, match="second writer process failed") as full:
        in_forked_process(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))()
    assert full.value.errno == errno.ENOSPC  # the worker's disk_full() hands such a job back
    with pytest.raises(RuntimeError, match="ended without a result"):
        in_forked_process(lambda: os.kill(os.getpid(), signal.SIGKILL))()


@pytest.mark.parametrize("threads", [1, 2])
def test_morphology_in_slabs_and_threads_equals_one_whole_volume_transform(monkeypatch: pytest.MonkeyPatch,
                                                                           threads: int) -> None:
    """Slabs (here 5 slices, so there are many) written by two threads give the whole-volume answer."""
    from scipy import ndimage

    from dicom_node.pipeline import morphology

    monkeypatch.setattr(morphology, "SLAB", 5)
    monkeypatch.setattr(morphology, "THREADS", threads)
    rng = np.random.default_rng(7)
    mask = rng.random((40, 30, 34)) > 0.97
    mask[10:30, 5:25, 8:28] = True
    sp = (0.5, 0.4, 0.45)
    assert np.array_equal(morphology.dilate_mm(mask, sp, 1.2),
                          ndimage.distance_transform_edt(~mask, sampling=sp) <= 1.2 + 1e-6)
    padded = np.pad(mask, 6, constant_values=True)  # outside the volume counts as foreground
    want = (ndimage.distance_transform_edt(padded, sampling=sp) > 1.0 + 1e-6)[6:-6, 6:-6, 6:-6]
    assert np.array_equal(morphology.erode_mm(mask, sp, 1.0), want) and want.any()


def test_a_long_confidence_description_is_cut_in_ascii():
    """Many regions overrun the segment description's 64 characters; it is cut with "...", which every
    character set holds (a "…" was written as "?" in the SEG)."""
    from dicom_node.pipeline.restore import RegionReport
    from dicom_node.pipeline.seg import _confidence_text

    reports = [RegionReport(k, [k], 10, 105.0 + k, k % 2 == 0, "restored", measure="blur") for k in range(1, 13)]
    text = _confidence_text(reports)
    assert len(text) == 64 and text.endswith("...") and text.isascii()
    assert _confidence_text(reports[:2]) == "blur disagreement HU by region: 1=106 2=107!"


def test_without_a_second_pass_the_description_gives_each_regions_calibre():
    """The subtraction measures no disagreement by default (``engine.subtract_unsure_hu = 0``): segment 2's
    description then gives each region's vessel calibre, ``!`` marking the unsure; with neither, nothing."""
    from dicom_node.pipeline.restore import RegionReport
    from dicom_node.pipeline.seg import _confidence_text

    reports = [RegionReport(1, [1], 10, None, False, "restored", measure="blur", vessel_mm=3.42),
               RegionReport(2, [2], 10, None, True, "restored, unsure", measure="blur", vessel_mm=2.3)]
    assert _confidence_text(reports) == "vessel calibre mm by region: 1=3.4 2=2.3!"
    assert _confidence_text([RegionReport(1, [1], 10, None, False, "restored")]) == ""
