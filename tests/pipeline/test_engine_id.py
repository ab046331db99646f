"""What made an output names it: the derived series' UIDs hang on ``process.engine_id``, so the same series processed
under other detection rules must get other UIDs (never a silent replacement of the first result), while outputs made
with the default rules keep the ids they always had."""

from __future__ import annotations

from dicom_node.config import load
from dicom_node.pipeline.process import engine_id


def _config(tmp_path, name: str, lines: str, method: str = "subtract"):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[engine]\nmethod = "{method}"\n{lines}\n')
    return load(path)


def test_the_detection_rules_name_the_output(tmp_path):
    plain = engine_id(_config(tmp_path, "plain", ""))
    assert engine_id(_config(tmp_path, "defaults", "sharp_contrast_hu = 0.0\nthreshold_hu = 700.0")) == plain
    sharp = engine_id(_config(tmp_path, "sharp", "sharp_contrast_hu = 150.0"))
    level = engine_id(_config(tmp_path, "level", 'sharp_contrast_hu = 150.0\nsharp_level = "sharpened"'))
    assert sharp.startswith(plain + "-rules-") and level.startswith(plain + "-rules-")
    assert len({plain, sharp, level}) == 3
    network = engine_id(_config(tmp_path, "network", "", method="network"))
    assert engine_id(_config(tmp_path, "net-650", "threshold_hu = 650.0", method="network")) != network


def test_a_subtractions_id_stands_until_a_setting_changes_its_output(tmp_path):
    """The subtraction's options name its output, but options added later at their defaults must not rename the
    outputs made before them: the plain subtraction's id as recorded before the dim-lumen estimate existed
    (issue 16's thirty-second session; it changes only when a setting of the subtraction changes what it writes)."""
    from dicom_node.config import REPO

    plain = engine_id(_config(tmp_path, "plain", ""))
    assert plain == "subtract-20fa9e87f2"
    dim = REPO / "engines" / "calcium_excess_dim.npz"
    first = REPO / "engines" / "calcium_excess_ref.npz"
    alone = engine_id(_config(tmp_path, "ref", f'subtract_estimate = "{first}"'))
    used = engine_id(_config(tmp_path, "dim", f'subtract_estimate = "{first}"\nsubtract_dim_estimate = "{dim}"\n'
                                               "subtract_dim_lumen_hu = 360.0"))
    assert used != alone and alone != plain


def test_detection_rules_added_later_keep_the_ids_of_outputs_made_before_them(tmp_path):
    """The recommended detection's ids as recorded before the beyond-the-bloom noise test existed (issue 16's
    thirty-fourth session): off, its fields add nothing to the id; on, they rename the output."""
    level = 'sharp_contrast_hu = 150.0\nsharp_level = "sharpened"'
    assert engine_id(_config(tmp_path, "sharp", "sharp_contrast_hu = 150.0")) == "subtract-20fa9e87f2-rules-449fb8bd"
    assert engine_id(_config(tmp_path, "level", level)) == "subtract-20fa9e87f2-rules-6b3ce26a"
    assert engine_id(_config(tmp_path, "idle", level + "\nnoise_away_min_mm3 = 5.0")) == \
        "subtract-20fa9e87f2-rules-6b3ce26a"  # the test is off: its size floor changes no voxel
    away = engine_id(_config(tmp_path, "away", level + "\nnoise_away_mm = 2.0"))
    assert away.startswith("subtract-20fa9e87f2-rules-") and away != "subtract-20fa9e87f2-rules-6b3ce26a"
    assert engine_id(_config(tmp_path, "away5", level + "\nnoise_away_mm = 2.0\nnoise_away_min_mm3 = 5.0")) != away
