"""The node's settings: config.toml documents the embedded defaults, and bad peers fail at load time."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicom_node.config import Config, ConfigError, load

REPO = Path(__file__).resolve().parents[2]


def test_config_toml_matches_the_embedded_defaults() -> None:
    from_file, embedded = load(REPO / "config.toml"), Config()
    from_file.spool.dir = embedded.spool.dir  # the file's relative path resolves beside it
    assert from_file.node == embedded.node
    assert from_file.http == embedded.http and from_file.jobs == embedded.jobs
    assert from_file.spool == embedded.spool and from_file.destinations == embedded.destinations == []


def test_destinations_and_allowlist_parse(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("""
[node]
ae_title = "CALCNODE"
[[node.allowed]]
ae_title = "PACS"
host = "10.0.0.5"
[spool]
dir = "var/spool"
[[destinations]]
name = "archive"
ae_title = "PACS"
host = "10.0.0.5"
port = 4242
[[destinations]]
name = "web"
kind = "stow"
url = "https://pacs/dicom-web"
token = "s3cret"
""")
    cfg = load(cfg_file)
    assert cfg.node.ae_title == "CALCNODE" and [(p.ae_title, p.host) for p in cfg.node.allowed] == [("PACS",
                                                                                                      "10.0.0.5")]
    assert [(d.name, d.kind) for d in cfg.destinations] == [("archive", "dimse"), ("web", "stow")]
    assert cfg.destinations[1].token == "s3cret" and cfg.destinations[0].port == 4242
    assert cfg.spool.dir == str((tmp_path / "var" / "spool").resolve())


@pytest.mark.parametrize("text, message", [
    ('[[destinations]]\nname = "a"\nkind = "dimse"\nhost = "h"\n', "needs ae_title"),
    ('[[destinations]]\nname = "a"\nkind = "ftp"\n', "kind must be"),
    ('[[destinations]]\nname = "a"\nkind = "stow"\nurl = "http://x"\n[[destinations]]\nname = "a"\nkind = "stow"\n'
     'url = "http://y"\n', "duplicate name"),
    ('[[destinations]]\nname = "a"\nkind = "stow"\nurl = "http://x"\ncolour = "red"\n', "unknown setting 'colour'"),
    ('[[node.allowed]]\nae_title = "X"\n', "ae_title and host"),
    ('[jobs]\nworkers = 0\n', "at least 1"),
    ('[node]\nallowed = "everyone"\n', "must be an array"),
])
def test_bad_node_settings_are_refused(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(f)


@pytest.mark.parametrize(("table", "line", "key"), [
    ("engine", 'backend = "gpu"', "engine.backend"), ("engine", 'mask_mode = "paper"', "engine.mask_mode"),
    ("spool", 'durability = "fast"', "spool.durability"),
    ("destinations", 'name = "x"\nkind = "ftp"\nurl = "http://127.0.0.1:1"', "destinations[0].kind"),
])
def test_a_word_outside_its_choices_is_refused_at_load_naming_the_key(tmp_path, table, line, key) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[{'[destinations]' if table == 'destinations' else table}]\n{line}\n")
    with pytest.raises(ConfigError, match=re.escape(key) + " must be one of"):
        load(path)


def test_a_kernel_table_loads_and_is_checked(tmp_path: Path) -> None:
    """[engine.scanner_kernels]: any kernel name, each an MTF50 the subtraction can assume; a bad one fails at load."""
    f = tmp_path / "c.toml"
    f.write_text('[engine]\nmethod = "subtract"\n[engine.scanner_kernels]\n"B26f" = 4\nSOFT = 3.5\n')
    cfg = load(f)
    assert cfg.engine.scanner_kernels == {"B26f": 4.0, "SOFT": 3.5}
    opts = cfg.engine.subtract_options()
    assert opts.for_kernel("b26f").blur.mtf50_lp_cm == 4.0 and opts.for_kernel("B30f") is opts
    for text, message in [('"B26f" = "soft"', "must be float"), ('"B26f" = 40.0', "not a CT kernel"),
                          ('"B26f" = 4.0\n"b26F " = 4.5', "must be given and differ")]:
        f.write_text(f"[engine.scanner_kernels]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load(f)
    # [engine.scanner_edge_enhance]: each kernel's edge lift, beside its MTF50; checked as any blur's
    f.write_text('[engine]\nmethod = "subtract"\n[engine.scanner_kernels]\nSHARP = 6.3\n'
                 '[engine.scanner_edge_enhance]\nSHARP = 0.8\nSOFT = 0\n')
    opts = load(f).engine.subtract_options()
    assert (opts.for_kernel("sharp").blur.edge_enhance, opts.for_kernel("sharp").blur.mtf50_lp_cm) == (0.8, 6.3)
    assert opts.for_kernel("SOFT").blur.edge_enhance == 0.0 and opts.for_kernel("B30f") is opts
    for text, message in [("SHARP = 3.0", "edge_enhance must lie in 0..2"), ('SHARP = "high"', "must be float")]:
        f.write_text(f"[engine.scanner_edge_enhance]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load(f)
    # the sharpened-image detection's settings are checked the same way
    for text, message in [("sharp_min_volume_mm3 = 0.0", "must be positive"), ("sharp_contrast_hu = -1.0", ">= 0"),
                          ("sharp_mtf50_lp_cm = 40.0", "not a CT kernel"), ("sharp_min_excess_mm3 = -1.0", ">= 0"),
                          ("grow_sharp_hu = -5.0", ">= 0"), ("grow_mm = 0.0", "must be positive"),
                          ("trim_sharp_hu = -5.0", ">= 0"), ("trim_mm = -1.0", "must be positive")]:
        f.write_text(f"[engine]\n{text}\n")
        with pytest.raises(ConfigError, match=message):
            load(f)
