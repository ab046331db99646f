"""All settings in one typed place; ``config.toml`` documents each one with its default.

The node runs on the embedded defaults below when no file is given. A file only
needs the settings it changes; unknown keys are an error, so a typo cannot silently
fall back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "engines" / "dense_unet.onnx"


@dataclass
class EngineConfig:
    backend: str = "auto"  # auto | onnxruntime | tensorrt
    model: str = str(DEFAULT_MODEL)
    threads: int = 0  # inference threads; 0 = one per core
    batch: int = 8  # windows per backend call
    threshold_hu: float = 700.0
    adaptive_threshold: bool = False
    metal_hu: float = 3000.0
    margin_mm: float = 1.4  # blooming margin restored around the calcium
    core: int = 16  # voxels a window may restore per axis (of 32)
    mask_mode: str = "footprint"  # footprint | cube (the paper's: hide each window's whole core)
    max_pixel_mm: float = 0.8  # refuse series coarser than this in-plane
    max_slice_mm: float = 1.25  # refuse series with slices further apart than this


@dataclass
class OutputConfig:
    series_number_offset: int = 1000
    write_seg: bool = True
    institution_name: str = ""
    station_name: str = ""


@dataclass
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


class ConfigError(ValueError):
    pass


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    hints = get_type_hints(type(obj))
    known = {f.name for f in fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be a table")
            _apply(current, value, f"{where}.{key}")
            continue
        want = hints[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want in (int, float, str, bool) and not isinstance(value, want):
            raise ConfigError(f"{where}.{key} must be {want.__name__}, got {value!r}")
        setattr(obj, key, value)


def load(path: str | Path | None = None) -> Config:
    """Embedded defaults, overridden by the file if one is given."""
    cfg = Config()
    if path is None:
        return cfg
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    _apply(cfg, data, p.name)
    model = Path(cfg.engine.model)
    if not model.is_absolute():
        cfg.engine.model = str((p.parent / model).resolve())
    return cfg
