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
