"""``dicom-node doctor`` shows the restoration the node runs and the blur the subtraction assumes per kernel.

The subtraction's result hangs on the kernel tables, which a site fills by hand or from ``measure-kernel``; doctor
is where a half-filled table (a lift without an MTF50) or tables the network ignores become visible.
"""

from __future__ import annotations

from pathlib import Path

from dicom_node import cli, config, doctor


def test_the_subtractions_tables_are_resolved_per_kernel_and_gaps_named():
    cfg = config.from_dict({"engine": {"method": "subtract", "scanner_kernels": {"SOFT": 3.41, "SHARP": 5.92},
                                       "scanner_edge_enhance": {"sharp": 0.7, "B46f": 0.8},
                                       "subtract_white_by_kernel": {"SOFT": 70.0}}})
    e = doctor.engine_report(cfg.engine)
    by = {k["kernel"]: k for k in e["kernels"]}
    assert set(by) == {"SOFT", "SHARP", "B46f"}  # one entry per kernel, whatever its spelling in each table
    soft = by["SOFT"]
    assert (soft["mtf50_lp_cm"], soft["edge_enhance"], soft["white_above_lumen_hu"]) == (3.41, 0.5, 70.0)
    assert (by["SHARP"]["mtf50_lp_cm"], by["SHARP"]["edge_enhance"]) == (5.92, 0.7)
    assert (by["B46f"]["mtf50_lp_cm"], by["B46f"]["edge_enhance"]) == (5.2, 0.8)
    assert e["default"]["mtf50_lp_cm"] == 5.2
    assert any(n.startswith("B46f: no MTF50") for n in e["notes"])
    assert any(n.startswith("SOFT: no edge lift") for n in e["notes"])
    assert not any(n.startswith("SHARP") for n in e["notes"])
    text = "\n".join(doctor._render_engine(e))
    assert "kernel SHARP: MTF50 5.92 lp/cm, edge lift 0.7" in text and "any other kernel: MTF50 5.2" in text


def test_no_tables_under_the_subtraction_point_to_measure_kernel_and_tables_under_the_network_are_named():
    e = doctor.engine_report(config.from_dict({"engine": {"method": "subtract"}}).engine)
    assert e["kernels"] == [] and "measure-kernel" in e["notes"][0]
    e = doctor.engine_report(config.from_dict({"engine": {"scanner_kernels": {"B26f": 4.3}}}).engine)
    assert e["method"] == "network" and 'apply to method = "subtract" or "auto" only' in e["notes"][0]


def test_auto_is_shown_per_kernel_the_subtraction_where_measured_and_the_network_elsewhere():
    cfg = config.from_dict({"engine": {"method": "auto", "scanner_kernels": {"B26f": 4.14},
                                       "scanner_edge_enhance": {"B26f": 0.29, "FC12": 0.0}}})
    e = doctor.engine_report(cfg.engine)
    by = {k["kernel"]: k for k in e["kernels"]}
    assert by["B26f"]["method"] == "subtract" and by["FC12"]["method"] == "network"
    assert any(n.startswith("FC12: not in [engine.scanner_kernels]: method auto runs the network") for n in e["notes"])
    text = "\n".join(doctor._render_engine(e))
    assert "engine:       auto (subtract with the white-level rule where the kernel is measured" in text
    assert "kernel B26f: subtract, MTF50 4.14 lp/cm, edge lift 0.29" in text and "kernel FC12: network" in text
    assert "any other kernel: network" in text
    e = doctor.engine_report(config.from_dict({"engine": {"method": "auto"}}).engine)
    assert any("method auto runs the network for every series" in n for n in e["notes"])


def test_doctor_prints_the_engine_from_the_config(tmp_path: Path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('[engine]\nmethod = "subtract"\n[engine.scanner_kernels]\nFC12 = 2.87\n')
    assert cli.main(["doctor", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "engine:       subtract (white-level rule)" in out and "kernel FC12: MTF50 2.87 lp/cm" in out


def test_the_readmes_recommended_subtraction_loads_and_every_kernel_is_complete():
    """The README's config block for the recommended subtraction is a working config (docs that cannot rot)."""
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Measuring the site's kernels", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    values = tomllib.loads(block)
    engines = Path(__file__).resolve().parents[1] / "engines"  # the block's paths are an installation's
    values["engine"]["subtract_estimate"] = str(engines / Path(values["engine"]["subtract_estimate"]).name)
    values["engine"]["subtract_companions"] = [str(engines / Path(f).name)
                                               for f in values["engine"]["subtract_companions"]]
    cfg = config.from_dict(values)
    e = doctor.engine_report(cfg.engine)
    assert e["method"] == "auto" and e["estimate"].endswith("calcium_excess_ref.npz")
    assert cfg.engine.subtract_combine == "enclosed" and cfg.engine.subtract_enclosed_share == 0.7
    assert [Path(f).name for f in cfg.engine.subtract_companions] == ["calcium_excess_split.npz"]
    assert cfg.engine.sharp_contrast_hu == 150.0 and e["kernels"]
    assert cfg.engine.unsure_enclosure == 0.7
    assert "calcium enclosing the lumen over 0.7" in e["unsure"]["rules"]["subtract"]
    assert all(k["method"] == "subtract" for k in e["kernels"]), "every kernel of the block is measured"
    assert not [n for n in e["notes"] if not n.startswith("method auto: the subtraction for the kernels")]


def test_doctor_says_what_makes_a_restoration_unsure_for_each_method_it_runs():
    """The flag decides which lesions may be read on the derived series: doctor names its rules per method (under
    auto both; the sharpened-image reason only where that test runs) and what is done with an unsure one."""
    e = doctor.engine_report(config.from_dict({"engine": {"method": "auto", "sharp_contrast_hu": 150.0}}).engine)
    rules = e["unsure"]["rules"]
    assert rules["network"] == ["flip disagreement over 30 HU", "vessel under 2.75 mm"]
    assert rules["subtract"] == ["vessel under 2.75 mm", "calcium found only in the sharpened image"]
    text = "\n".join(doctor._render_engine(e))
    assert "unsure (subtract): vessel under 2.75 mm, calcium found only in the sharpened image; then restored and " \
           "marked" in text
    e = doctor.engine_report(config.from_dict({"engine": {"method": "subtract", "subtract_unsure_hu": 90.0,
                                                          "unsure_vessel_mm": 0.0, "unsure_action": "leave"}}).engine)
    assert e["unsure"] == {"action": "leave", "rules": {"subtract": ["blur disagreement over 90 HU"]}}
    dim = doctor.engine_report(config.from_dict({"engine": {"method": "subtract", "unsure_lumen_hu": 330.0}}).engine)
    assert dim["unsure"]["rules"]["subtract"] == ["vessel under 2.75 mm", "lumen dimmer than 330 HU"]
    ring = doctor.engine_report(config.from_dict({"engine": {"method": "auto", "unsure_enclosure": 0.7}}).engine)
    assert ring["unsure"]["rules"]["subtract"][-1] == "calcium enclosing the lumen over 0.7"
    assert not any("enclosing" in w for w in ring["unsure"]["rules"]["network"]), "the network's are not measured"
    text = "\n".join(doctor._render_engine(e))
    assert "unsure (subtract): blur disagreement over 90 HU; then left as acquired" in text
    e = doctor.engine_report(config.from_dict({"engine": {"confidence": False, "unsure_vessel_mm": 0.0}}).engine)
    assert e["unsure"]["rules"] == {"network": []}
    assert "unsure (network): never (no rule on)" in "\n".join(doctor._render_engine(e))


def test_doctor_says_how_the_subtraction_sharpens_and_who_decided():
    """A learnt estimate is fed what it was trained on, whatever engine.subtract_anatomy_hu says; doctor names the
    sharpening and who set it, and says so when the config asks for something the estimate's file overrides."""
    from dicom_node.config import REPO

    rule = doctor.engine_report(config.from_dict({"engine": {"method": "subtract", "subtract_anatomy_hu": 100.0}})
                                .engine)
    assert rule["sharpening"] == {"method": "split", "anatomy_above_level_hu": 100.0,
                                  "set_by": "engine.subtract_anatomy_hu"}
    assert "  sharpening: split, anatomy at most 100 HU above the contrast (set by engine.subtract_anatomy_hu)" \
        in doctor._render_engine(rule)
    split = str(REPO / "engines" / "calcium_excess_split.npz")
    e = doctor.engine_report(config.from_dict({"engine": {"method": "subtract", "subtract_estimate": split}}).engine)
    assert e["sharpening"]["method"] == "split" and e["sharpening"]["set_by"] == "the estimate's file"
    ref = str(REPO / "engines" / "calcium_excess_ref.npz")
    e = doctor.engine_report(config.from_dict({"engine": {"method": "subtract", "subtract_estimate": ref,
                                                          "subtract_anatomy_hu": 100.0}}).engine)
    assert e["sharpening"]["method"] == "plain"
    assert any("applies to the white-level rule only" in n for n in e["notes"])


def test_doctor_names_the_estimates_beside_the_first_and_which_restoration_is_written():
    """With ``engine.subtract_companions`` every region is restored once per estimate: doctor lists them, how each
    sharpens, which restoration is written and that their disagreement (not a softer blur's) makes a region unsure."""
    from dicom_node.config import REPO

    ref, split = (str(REPO / "engines" / f"calcium_excess_{n}.npz") for n in ("ref", "split"))
    e = doctor.engine_report(config.from_dict({"engine": {
        "method": "subtract", "subtract_estimate": ref, "subtract_companions": [split], "subtract_combine": "mean",
        "confidence": True, "subtract_unsure_hu": 40.0}}).engine)
    assert e["companions"] == [{"estimate": split, "sharpening": {"method": "split", "anatomy_above_level_hu": 100.0,
                                                                  "set_by": "the estimate's file"}}]
    lines = doctor._render_engine(e)
    assert f"  also estimated by {split} (split sharpening)" in lines
    assert "  restoration written: the mean of all" in lines
    assert "estimate disagreement over 40 HU" in e["unsure"]["rules"]["subtract"]
    enclosed = doctor.engine_report(config.from_dict({"engine": {
        "method": "subtract", "subtract_estimate": ref, "subtract_companions": [split],
        "subtract_combine": "enclosed"}}).engine)
    assert "  restoration written: the second estimate's where the calcium encloses the lumen, else the first's" \
        in doctor._render_engine(enclosed)
    alone = doctor.engine_report(config.from_dict({"engine": {"method": "subtract", "subtract_estimate": ref}}).engine)
    assert "companions" not in alone and not any("also estimated" in line for line in doctor._render_engine(alone))
    dim_file = str(REPO / "engines" / "calcium_excess_dim.npz")
    dim = doctor.engine_report(config.from_dict({"engine": {
        "method": "subtract", "subtract_estimate": ref, "subtract_dim_estimate": dim_file,
        "subtract_dim_lumen_hu": 360.0}}).engine)
    assert dim["dim"] == {"estimate": dim_file, "below_hu": 360.0} and "dim" not in alone
    assert f"  beside a lumen under 360 HU: {dim_file} in the first estimate's place" in doctor._render_engine(dim)
    unused = doctor.engine_report(config.from_dict({"engine": {
        "method": "subtract", "subtract_estimate": ref, "subtract_dim_estimate": dim_file}}).engine)
    assert "dim" not in unused and any("never used" in n for n in unused["notes"])


def test_doctor_names_the_learnt_detector_and_what_it_may_do():
    """A learnt detector decides which voxels are restored: doctor says which file, whether it only trims the rules'
    calcium or decides its whole pool, at which probability, and (under auto) that it runs for subtracted series."""
    from dicom_node.config import REPO

    detector = str(REPO / "engines" / "calcium_detect.npz")
    e = doctor.engine_report(config.from_dict({"engine": {
        "method": "auto", "sharp_contrast_hu": 150.0, "detect_learnt": detector, "detect_learnt_mode": "trim",
        "detect_learnt_probability": 0.3}}).engine)
    assert e["detector"] == {"file": detector, "mode": "trim", "probability": 0.3}
    assert (f"  calcium detection: {detector} gives back the rules' calcium it calls lumen (probability > 0.3; "
            "subtracted series only)") in doctor._render_engine(e)
    decide = doctor.engine_report(config.from_dict({"engine": {"method": "subtract",
                                                               "detect_learnt": detector}}).engine)
    assert decide["detector"]["mode"] == "decide" and decide["detector"]["probability"] == 0.5
    assert any("decides the voxels" in line and "every series" in line for line in doctor._render_engine(decide))
    plain = doctor.engine_report(config.from_dict({"engine": {"method": "subtract"}}).engine)
    assert "detector" not in plain and not any("calcium detection" in x for x in doctor._render_engine(plain))
