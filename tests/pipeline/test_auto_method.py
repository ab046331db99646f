"""engine.method = "auto": the subtraction for the kernels a site measured, the network for the rest."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.config import Config, EngineConfig
from dicom_node.pipeline.detect import DetectOptions
from dicom_node.pipeline.process import engine_id
from dicom_node.pipeline.restore import Engine
from dicom_node.pipeline.subtract import SubtractOptions

TABLES = SubtractOptions(kernels=(("B26f", 4.3),), enhance_by_kernel=(("B26f", 0.3), ("FC12", 0.0)))


class _NoBackend:
    """A stand-in the network path must never reach in these tests."""


def _engine(method: str) -> Engine:
    return Engine(_NoBackend(), DetectOptions(sharp_contrast_hu=150.0), method=method, subtract=TABLES)


def test_auto_chooses_by_the_mtf50_table_only():
    auto = _engine("auto")
    assert auto.method_for("B26f") == "subtract"
    assert auto.method_for("b26F\\I26") == "subtract"  # the header's first value, any case
    assert auto.method_for("FC12") == "network", "a lift alone is not a measured blur"
    assert auto.method_for("") == "network"
    assert _engine("network").method_for("B26f") == "network"
    assert _engine("subtract").method_for("FC12") == "subtract"


def test_auto_runs_the_sharpened_image_test_for_the_subtractions_series_only():
    auto = _engine("auto")
    assert auto.detect_options_for("B26f").sharp_contrast_hu == 150.0
    assert auto.detect_options_for("B26f").sharp_mtf50_lp_cm == 4.3
    assert auto.detect_options_for("FC12").sharp_contrast_hu == 0.0
    # a site that chose the network or the subtraction outright keeps its setting for every kernel
    assert _engine("network").detect_options_for("FC12").sharp_contrast_hu == 150.0
    assert _engine("subtract").detect_options_for("FC12").sharp_contrast_hu == 150.0


@pytest.mark.parametrize("option", ["grow_sharp_hu", "trim_sharp_hu"])
def test_the_growth_and_trim_in_the_sharpened_image_follow_the_kernel_table_and_auto_as_the_test_does(option):
    """``grow_sharp_hu`` and ``trim_sharp_hu`` sharpen as the sharpened-image test does: under the site's table
    for a listed kernel (even with the test itself off), and not at all for a series ``auto`` gives the network."""
    tables = SubtractOptions(kernels=(("B26f", 3.6),))
    engine = Engine(_NoBackend(), DetectOptions(**{option: 50.0}), method="auto", subtract=tables)
    listed = engine.detect_options_for("B26f")
    assert getattr(listed, option) == 50.0 and listed.sharp_mtf50_lp_cm == 3.6
    assert getattr(engine.detect_options_for("FC12"), option) == 0.0
    assert not engine.detect_options_for("FC12").sharpens


def test_auto_needs_the_network():
    with pytest.raises(ValueError, match="auto method needs a backend"):
        Engine(None, method="auto")


def test_a_series_under_auto_is_named_by_what_restored_it(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    tables = {"scanner_kernels": {"B26f": 4.3}}
    auto = Config(engine=EngineConfig(model=str(model), method="auto", **tables))
    network = Config(engine=EngineConfig(model=str(model), method="network", **tables))
    subtract = Config(engine=EngineConfig(model=str(model), method="subtract", **tables))
    assert engine_id(auto, "B26f") == engine_id(subtract) != engine_id(network)
    assert engine_id(auto, "FC12") == engine_id(network)
    node = engine_id(auto)
    assert node.startswith("auto-") and node not in (engine_id(network), engine_id(subtract))


def test_settings_of_the_sharpened_image_do_not_rename_a_series_auto_gives_the_network(tmp_path):
    """Under auto a series of an unlisted kernel is detected without the sharpened image
    (``Engine.detect_options_for``): its voxels are the network's own, so its UIDs must be too, whatever the site
    set for the sharpened image; a listed kernel's output is named by those settings, and a rule both paths run
    (the threshold) names both."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    tables = {"scanner_kernels": {"B26f": 4.3}}
    sharp = {"sharp_contrast_hu": 150.0, "sharp_level": "sharpened", "sharp_min_volume_mm3": 2.5}
    network = Config(engine=EngineConfig(model=str(model), method="network", **tables))
    auto = Config(engine=EngineConfig(model=str(model), method="auto", **tables, **sharp))
    subtract = Config(engine=EngineConfig(model=str(model), method="subtract", **tables, **sharp))
    assert engine_id(auto, "FC12") == engine_id(network)
    assert engine_id(auto, "B26f") == engine_id(subtract) != engine_id(
        Config(engine=EngineConfig(model=str(model), method="subtract", **tables)))
    engine = Engine(_NoBackend(), auto.engine.detect_options(), method="auto", subtract=auto.engine.subtract_options())
    assert engine.detect_options_for("FC12") == network.engine.detect_options(), "named as it detects"
    both = Config(engine=EngineConfig(model=str(model), method="auto", threshold_hu=650.0, **tables, **sharp))
    assert engine_id(both, "FC12") != engine_id(network)


def test_an_unlisted_kernel_is_restored_by_the_network_path(monkeypatch):
    """Under auto, a series of an unlisted kernel goes through the network's windows (the backend is asked),
    a listed one through the subtraction (it is not)."""
    from dicom_node_lab import phantom

    p = phantom.generate((32, 64, 64), seed=3, options=phantom.PhantomOptions(n_vessels=(1, 1),
                                                                              calcified_probability=1.0))
    calls = []

    class Identity:
        name = "identity"
        max_batch = 8

        def run(self, image, mask):
            calls.append(len(image))
            return image

    engine = Engine(Identity(), method="auto", subtract=TABLES)
    volume = p.image.astype(np.float32)
    listed = engine.run(volume.copy(), p.spacing, kernel="B26f")
    assert listed.method == "subtract" and not calls
    if not listed.detection.lesions:
        pytest.skip("the phantom drew no calcium to restore")
    other = engine.run(volume.copy(), p.spacing, kernel="FC12")
    assert other.method == "network" and calls


def test_every_setting_of_the_sharpened_image_is_reset_where_nothing_is_sharpened():
    """``without_sharpening`` names what an unsharpened detection runs (``engine_id``): a setting added for the
    sharpened-image rules (named ``sharp_*``, ``grow_*``, ``trim_*``, ``learnt*``) must be switched off or put back
    to its default there, or network outputs under auto are renamed by a setting that changed none of their voxels."""
    import dataclasses

    from dicom_node.pipeline.detect import _SHARPENING_ONLY

    switches = {"sharp_contrast_hu", "grow_sharp_hu", "trim_sharp_hu", "learnt"}
    named = {f.name for f in dataclasses.fields(DetectOptions)
             if f.name.startswith(("sharp_", "grow_", "trim_", "learnt"))}
    assert named == switches | set(_SHARPENING_ONLY)
    changed = DetectOptions(sharp_contrast_hu=150.0, sharp_level="sharpened", sharp_min_volume_mm3=2.5, grow_mm=2.0,
                            trim_mm=2.0, learnt_mode="trim", learnt_probability=0.3)
    assert changed.without_sharpening() == DetectOptions()
