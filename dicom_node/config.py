"""All settings in one typed place; ``config.toml`` documents each one with its default.

The node runs on the embedded defaults below when no file is given. A file only
needs the settings it changes; unknown keys are an error, so a typo cannot silently
fall back to a default.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from dicom_node.pipeline.detect import DetectOptions, LearntMode, SharpLevel
from dicom_node.pipeline.detect_learnt import LearntCalcium
from dicom_node.pipeline.restore import ConfidenceOptions, Method, UnsureAction
from dicom_node.pipeline.series import REFUSED_IMAGE_TYPES
from dicom_node.pipeline.structure import MAX_ELEMENT_MB, MAX_SEQUENCE_DEPTH
from dicom_node.pipeline.subtract import EstimateCombine, KeepLumen, LearntExcess, ScannerBlur, SubtractOptions
from dicom_node.pipeline.windows import MaskMode, WindowOptions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "engines" / "dense_unet.onnx"


# The settings that take one of a few words: checked when the config loads, with the key named.
Backend = Literal["auto", "onnxruntime", "tensorrt"]
Durability = Literal["journal", "posix"]
DestinationKind = Literal["dimse", "stow"]


@dataclass
class EngineConfig:
    backend: Backend = "auto"
    model: str = str(DEFAULT_MODEL)
    threads: int = 0  # inference threads; 0 = one per core
    batch: int = 8  # windows per backend call
    # Detection and windows: the operator-facing part of DetectOptions and WindowOptions, whose defaults
    # these are (defined there, once); ENGINE_KEYS says which key feeds which option.
    threshold_hu: float = DetectOptions.threshold_hu
    adaptive_threshold: bool = DetectOptions.adaptive
    local_contrast_hu: float = DetectOptions.local_contrast_hu  # also calcium: deposits this far above their vessel
    local_extent_hu: float = DetectOptions.local_extent_hu  # ... taken down to this far above it; 0 = off
    metal_hu: float = DetectOptions.metal_hu
    keep_edge_components: bool = DetectOptions.keep_edge_components  # bright pieces cut by the volume's edge
    noise_sigmas: float = DetectOptions.noise_sigmas  # small components must peak this many noise SDs up; 0 = off
    noise_keep_mm3: float = DetectOptions.noise_keep_mm3  # ... components this large are kept regardless
    noise_away_mm: float = DetectOptions.noise_away_mm  # ... or peaking so far above the level this far away; 0 = off
    noise_away_min_mm3: float = DetectOptions.noise_away_min_mm3  # ... when at least this large
    sharp_contrast_hu: float = DetectOptions.sharp_contrast_hu  # also calcium: this far above contrast, sharpened
    sharp_min_volume_mm3: float = DetectOptions.sharp_min_volume_mm3  # ... components at least this large
    sharp_mtf50_lp_cm: float = DetectOptions.sharp_mtf50_lp_cm  # ... sharpened under this blur
    sharp_max_above_hu: float = DetectOptions.sharp_max_above_hu  # ... and not already this bright as acquired
    sharp_min_excess_mm3: float = DetectOptions.sharp_min_excess_mm3  # ... or smaller, this much excess in noise SDs
    sharp_level: SharpLevel = DetectOptions.sharp_level  # ... compared with the acquired or the sharpened level
    grow_sharp_hu: float = DetectOptions.grow_sharp_hu  # found deposits grow where this far above contrast, sharpened
    grow_mm: float = DetectOptions.grow_mm  # ... up to this far from where they were found
    trim_sharp_hu: float = DetectOptions.trim_sharp_hu  # found deposits lose lumen-side voxels this near contrast
    trim_mm: float = DetectOptions.trim_mm  # ... at most this deep from the lumen
    # A learnt calcium detector (.npz from the lab's calcium_detector.py) that decides, after the rules, the voxels
    # near and above the contrast level in the sharpened image; "" = the rules alone. Relative: from the config file.
    detect_learnt: str = ""
    detect_learnt_probability: float = DetectOptions.learnt_probability  # ... calcium above this; 0 = the file's
    detect_learnt_min_volume_mm3: float = DetectOptions.learnt_min_volume_mm3  # ... new deposits at least this
    detect_learnt_mode: LearntMode = DetectOptions.learnt_mode  # ... decide its whole pool, or only trim the rules'
    margin_mm: float = WindowOptions.margin_mm  # blooming margin restored around the calcium
    core: int = WindowOptions.core  # voxels a window may restore per axis (of 32)
    mask_mode: MaskMode = WindowOptions.mask_mode  # cube: the paper's, hiding each window's whole core
    confidence: bool = ConfidenceOptions.flips  # a mirrored second pass measures how sure each restoration is
    unsure_hu: float = ConfidenceOptions.unsure_hu  # a region whose two passes differ more than this is unsure
    unsure_action: UnsureAction = ConfidenceOptions.unsure_action  # mark / leave as acquired / guard (keep lumen)
    unsure_vessel_mm: float = ConfidenceOptions.unsure_vessel_mm  # a region in a narrower vessel is unsure; 0 = off
    unsure_lumen_hu: float = ConfidenceOptions.unsure_lumen_hu  # ... or beside a dimmer lumen (HU); 0 = off
    unsure_enclosure: float = ConfidenceOptions.unsure_enclosure  # ... or calcium enclosing it more (0-1); 0 = off
    keep_visible_lumen: bool = ConfidenceOptions.keep_visible_lumen  # never darken visible lumen past its edge
    average_flips: bool = ConfidenceOptions.average_flips  # write the mean of the two passes (needs confidence)
    lumen_guard_from: float = ConfidenceOptions.lumen_guard_from  # guard voxels this far from edge (0) to level (1)
    method: Method = "network"  # network: the Dense-Unet inpaints; subtract: the calcium's blur is subtracted
    scanner_mtf50_lp_cm: float = ScannerBlur.mtf50_lp_cm  # subtract: the blur assumed in-plane ...
    scanner_slice_fwhm_mm: float = ScannerBlur.slice_fwhm_mm  # ... and along z
    subtract_white_hu: float = SubtractOptions.white_above_lumen_hu  # subtract: calcium is this far above contrast
    subtract_tv_weight: float = SubtractOptions.tv_weight  # subtract: how flat the sharpened image is drawn
    subtract_second_mtf50_lp_cm: float = SubtractOptions.second_blur.mtf50_lp_cm  # subtract, confidence: 2nd blur
    subtract_unsure_hu: float = SubtractOptions.unsure_hu  # subtract: a region whose two blurs differ more is unsure
    subtract_reach_hu: float = SubtractOptions.reach_hu  # subtract: also write where calcium blur adds more
    subtract_refit_iterations: int = SubtractOptions.refit_iterations  # subtract: refit the calcium's excess (0: off)
    subtract_grow_hu: float = SubtractOptions.grow_above_lumen_hu  # subtract: calcium's flank down to this (0: off)
    subtract_keep_lumen: KeepLumen = SubtractOptions.keep_lumen  # subtract: hold visible lumen in no/unsure/all regions
    subtract_keep_lumen_mm: float = SubtractOptions.keep_lumen_beyond_mm  # ... this far (mm) from the calcium
    subtract_anatomy_hu: float = SubtractOptions.anatomy_above_level_hu  # subtract, rule: split sharpening (0: off)
    # subtract: a learnt calcium estimate (.npz from the lab's calcium_estimate.py) in place of the white-level
    # rule; "" = the rule. A relative path is taken from the config file's folder, like the model's.
    subtract_estimate: str = ""
    # subtract: further learnt estimates run on every region beside subtract_estimate (relative paths as its),
    # their disagreement the confidence measure (with confidence and subtract_unsure_hu above 0) ...
    subtract_companions: list[str] = field(default_factory=list)
    # ... and which restoration is written: "first" (subtract_estimate's), "mean", or "wider" (the most lumen)
    subtract_combine: EstimateCombine = SubtractOptions.combine
    # ... with "enclosed": the share of directions (0-1) above which the calcium encloses the lumen
    subtract_enclosed_share: float = SubtractOptions.enclosed_above
    # subtract: a learnt estimate (relative path as subtract_estimate's) for the regions whose vessel's lumen is
    # dimmer than subtract_dim_lumen_hu, in the first's place ("" / 0 = one estimate for every lumen)
    subtract_dim_estimate: str = ""
    subtract_dim_lumen_hu: float = SubtractOptions.dim_below_hu
    # subtract: reconstruction kernel (ConvolutionKernel) -> the MTF50 (lp/cm) to assume for its series
    scanner_kernels: dict[str, float] = field(default_factory=dict)
    # subtract: reconstruction kernel -> subtract_white_hu for its series (a kernel not listed keeps that)
    subtract_white_by_kernel: dict[str, float] = field(default_factory=dict)
    # subtract: reconstruction kernel -> the edge enhancement (mid-frequency lift, 0-2) to assume for its series
    scanner_edge_enhance: dict[str, float] = field(default_factory=dict)
    max_pixel_mm: float = 0.8  # refuse series coarser than this in-plane
    max_slice_mm: float = 1.25  # refuse series with slices further apart than this

    def detect_options(self) -> DetectOptions:
        return DetectOptions(**{opt: getattr(self, key) for key, (kind, opt) in ENGINE_KEYS.items()
                                if kind is DetectOptions},
                             learnt=_learnt_detector(self.detect_learnt) if self.detect_learnt else None)

    def window_options(self) -> WindowOptions:
        return WindowOptions(**{opt: getattr(self, key) for key, (kind, opt) in ENGINE_KEYS.items()
                                if kind is WindowOptions})

    def subtract_options(self) -> SubtractOptions:
        blur = ScannerBlur(mtf50_lp_cm=self.scanner_mtf50_lp_cm, slice_fwhm_mm=self.scanner_slice_fwhm_mm)
        second = ScannerBlur(mtf50_lp_cm=self.subtract_second_mtf50_lp_cm, slice_fwhm_mm=self.scanner_slice_fwhm_mm)
        return SubtractOptions(blur=blur, tv_weight=self.subtract_tv_weight,
                               white_above_lumen_hu=self.subtract_white_hu, second_blur=second,
                               unsure_hu=self.subtract_unsure_hu, kernels=tuple(self.scanner_kernels.items()),
                               reach_hu=self.subtract_reach_hu, refit_iterations=self.subtract_refit_iterations,
                               grow_above_lumen_hu=self.subtract_grow_hu,
                               keep_lumen=self.subtract_keep_lumen, keep_lumen_beyond_mm=self.subtract_keep_lumen_mm,
                               anatomy_above_level_hu=self.subtract_anatomy_hu,
                               white_by_kernel=tuple(self.subtract_white_by_kernel.items()),
                               enhance_by_kernel=tuple(self.scanner_edge_enhance.items()),
                               learnt=_learnt_estimate(self.subtract_estimate) if self.subtract_estimate else None,
                               companions=tuple(_learnt_estimate(p) for p in self.subtract_companions),
                               combine=self.subtract_combine, enclosed_above=self.subtract_enclosed_share,
                               dim_learnt=_learnt_estimate(self.subtract_dim_estimate)
                               if self.subtract_dim_estimate else None,
                               dim_below_hu=self.subtract_dim_lumen_hu)

    def confidence_options(self) -> ConfidenceOptions:
        return ConfidenceOptions(**{opt: getattr(self, key) for key, (kind, opt) in ENGINE_KEYS.items()
                                    if kind is ConfidenceOptions})


def _learnt_estimate(path: str) -> LearntExcess:
    """The learnt estimate at ``path``, read once per version of the file.

    Why: ``subtract_options()`` is asked for by the config check, the engine's build and each job's engine id;
    reading and hashing the file each time costs little but is needless. Keyed by size and modification time,
    so a file replaced in place (a site installing new weights) is read again, with its new digest.
    """
    return _read_once(LearntExcess.load, path)


def _learnt_detector(path: str) -> LearntCalcium:
    """The learnt calcium detector at ``path``, read once per version of the file (as ``_learnt_estimate``)."""
    return _read_once(LearntCalcium.load, path)


def _read_once(loader: Callable[[str], Any], path: str) -> Any:
    st = Path(path).stat()  # a missing file raises here, as the load would
    return _file_version(loader, path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_version(loader: Callable[[str], Any], path: str, size: int, mtime_ns: int) -> Any:
    return loader(path)


# [engine] keys that are detection or window options: key -> (options class, field). The one place that
# maps the operator's names (kept stable for config files and documented commands) onto the pipeline's.
ENGINE_KEYS: dict[str, tuple[type, str]] = {
    "threshold_hu": (DetectOptions, "threshold_hu"), "adaptive_threshold": (DetectOptions, "adaptive"),
    "local_contrast_hu": (DetectOptions, "local_contrast_hu"), "local_extent_hu": (DetectOptions, "local_extent_hu"),
    "metal_hu": (DetectOptions, "metal_hu"), "keep_edge_components": (DetectOptions, "keep_edge_components"),
    "noise_sigmas": (DetectOptions, "noise_sigmas"), "noise_keep_mm3": (DetectOptions, "noise_keep_mm3"),
    "noise_away_mm": (DetectOptions, "noise_away_mm"), "noise_away_min_mm3": (DetectOptions, "noise_away_min_mm3"),
    "sharp_contrast_hu": (DetectOptions, "sharp_contrast_hu"),
    "sharp_min_volume_mm3": (DetectOptions, "sharp_min_volume_mm3"),
    "sharp_mtf50_lp_cm": (DetectOptions, "sharp_mtf50_lp_cm"),
    "sharp_max_above_hu": (DetectOptions, "sharp_max_above_hu"),
    "sharp_min_excess_mm3": (DetectOptions, "sharp_min_excess_mm3"),
    "sharp_level": (DetectOptions, "sharp_level"),
    "grow_sharp_hu": (DetectOptions, "grow_sharp_hu"), "grow_mm": (DetectOptions, "grow_mm"),
    "trim_sharp_hu": (DetectOptions, "trim_sharp_hu"), "trim_mm": (DetectOptions, "trim_mm"),
    "detect_learnt_probability": (DetectOptions, "learnt_probability"),
    "detect_learnt_min_volume_mm3": (DetectOptions, "learnt_min_volume_mm3"),
    "detect_learnt_mode": (DetectOptions, "learnt_mode"),
    "margin_mm": (WindowOptions, "margin_mm"), "core": (WindowOptions, "core"),
    "mask_mode": (WindowOptions, "mask_mode"), "confidence": (ConfidenceOptions, "flips"),
    "unsure_hu": (ConfidenceOptions, "unsure_hu"), "unsure_action": (ConfidenceOptions, "unsure_action"),
    "unsure_vessel_mm": (ConfidenceOptions, "unsure_vessel_mm"),
    "unsure_lumen_hu": (ConfidenceOptions, "unsure_lumen_hu"),
    "unsure_enclosure": (ConfidenceOptions, "unsure_enclosure"),
    "keep_visible_lumen": (ConfidenceOptions, "keep_visible_lumen"),
    "average_flips": (ConfidenceOptions, "average_flips"),
    "lumen_guard_from": (ConfidenceOptions, "lumen_guard_from"),
}


@dataclass
class OutputConfig:
    series_number_offset: int = 1000
    write_seg: bool = True
    write_report: bool = True  # a TID 1500 Structured Report of the lesions (needs write_seg: it points there)
    multiframe: bool = False  # also the derived series as one Legacy Converted Enhanced CT object
    # 2: a second (forked) process writes part of the slices and the pictures meanwhile; 1: one process
    write_processes: int = 2
    institution_name: str = ""
    station_name: str = ""


@dataclass
class AllowedPeer:
    """A calling AE we accept, and the host it must connect from (IP address or name)."""

    ae_title: str = ""
    host: str = ""


def _default_peers() -> list[AllowedPeer]:
    # Loopback helpers only, so `make serve` + `dicom-node demo`/storescu work out of the box.
    return [AllowedPeer(t, "127.0.0.1") for t in ("DICOMNODE-SCU", "STORESCU", "ECHOSCU")]


@dataclass
class TlsConfig:
    """DIMSE over TLS (PS3.15 Annex B) with mutual authentication: the hospital CA vouches for each caller."""

    enabled: bool = False
    port: int = 2762  # the TLS listener (2762 is the registered dicom-tls port)
    cert: str = ""  # our certificate chain (PEM); relative to the config file
    key: str = ""  # its private key (PEM, unencrypted)
    ca: str = ""  # CA certificates (PEM) that client certificates must chain to
    require_client_cert: bool = True  # false = any TLS client; the AE allowlist still applies
    keep_plain: bool = False  # also keep the unencrypted listener on node.port open (migration only)
    handshake_seconds: float = 10.0  # a client that has not finished the handshake by then is dropped


@dataclass
class NodeConfig:
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"  # listen address; "0.0.0.0" for every interface
    port: int = 11112
    max_pdu: int = 131072  # bytes; larger PDUs mean fewer reads per instance (ingest speed)
    accept_any_caller: bool = False  # true = skip the allowlist (never on a hospital network)
    check_called_ae: bool = True  # reject associations addressed to another AE title
    allowed: list[AllowedPeer] = field(default_factory=_default_peers)
    tls: TlsConfig = field(default_factory=TlsConfig)
    max_connections: int = 32  # open DICOM connections at once, from all callers together
    max_connections_per_host: int = 8  # ... and from one calling host (address)
    request_seconds: float = 10.0  # from TCP connect to the A-ASSOCIATE-RQ; then the caller is dropped
    idle_seconds: float = 60.0  # an association silent this long is aborted
    receiver_processes: int = 1  # >1: one listener hands each connection to the least busy of N processes


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    cert: str = ""  # with key: serve HTTPS (PEM files, relative to the config file)
    key: str = ""
    tokens: list[str] = field(default_factory=list)  # bearer tokens accepted on everything but /healthz
    token_env: str = "DICOM_NODE_HTTP_TOKENS"  # more tokens from this variable (comma or space separated)
    allow_anonymous: bool = False  # true = serve a non-loopback address without tokens (not recommended)
    max_body_mb: int = 2048  # larger STOW-RS bodies are refused (413) before or while they arrive
    max_parts: int = 2000  # parts in one STOW-RS request
    max_connections: int = 64  # HTTP connections at once; more get 503
    header_seconds: float = 10.0  # a request whose headers have not all arrived by then is dropped


@dataclass
class ViewerConfig:
    """Where the site's radiologists read studies: each job links there (the job page, GET /jobs)."""

    # e.g. "http://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study}"; fields {study}, {series}
    # (the original series) and {derived} (the derived series); "" = no link
    url_template: str = ""


@dataclass
class IntakeConfig:
    """Limits every received instance must keep, over DIMSE and STOW-RS alike, checked before it is stored."""

    max_sequence_depth: int = MAX_SEQUENCE_DEPTH  # nesting of sequences; 0 = unchecked (tests only)
    max_element_mb: int = MAX_ELEMENT_MB  # any element but Pixel Data
    # ImageType prefixes stored without a job, besides our own output (always) and localizers
    refuse_image_types: list[str] = field(default_factory=lambda: list(REFUSED_IMAGE_TYPES))


@dataclass
class SpoolConfig:
    dir: str = "spool"  # received instances, outputs and the job database; relative to the config file
    keep_days: float = 7.0  # purge finished jobs' files after this many days; 0 = keep forever
    purge_after_delivery: bool = False  # delete a job's files as soon as every destination has it
    min_free_mb: int = 512  # answer "out of resources" instead of filling the disk
    durability: Durability = "journal"  # journal: one fsync per instance; posix: plus a directory fsync
    quarantine_mb: int = 2048  # refused instances kept at most; the oldest go first
    quarantine_keep_days: float = 30.0  # refused instances and failed jobs' evidence are purged after this; 0 = never


@dataclass
class JobsConfig:
    quiet_seconds: float = 15.0  # a series is complete after this long without a new instance
    # ... or this long after the association (or STOW-RS request) that brought it was released, when no other
    # association is still sending it and nothing arrived since; 0 = the quiet timer only
    release_grace_seconds: float = 2.0
    workers: int = 2  # jobs handled at once (processing or sending)
    inference_slots: int = 1  # jobs running the model at once; bounds memory
    retries: int = 5  # send attempts after the first, then the job fails
    backoff_seconds: float = 5.0  # wait before the first retry; doubles each time
    backoff_max_seconds: float = 600.0
    memory_mb: int = 4096  # one job's processing (a child process) is killed above this resident memory
    timeout_seconds: float = 900.0  # ... or when it runs longer than this
    # Start each worker's next processing child ahead of its job, its libraries already imported: about a
    # second less per job, for one idle process (~150 MB) per worker
    warm_child: bool = True
    # When an association is released, a warm child reads the series and detects its calcium during the
    # release grace; the job uses that only if the series' files are still exactly those (needs warm_child)
    prepare_ahead: bool = True
    max_crashes: int = 2  # processing runs that crashed, were killed or never finished; then the job fails
    incomplete_seconds: float = 3600.0  # a series whose association was aborted waits this long for a re-send
    lease_seconds: float = 120.0  # a claimed job's lease, renewed every quarter; then another worker may take it
    # "" = SQLite in the spool (one host); "postgresql://user@host:port/db" = one store shared by many hosts
    # (the password from PGPASSWORD or PGPASSFILE, not this file; never logged)
    store: str = ""


MAX_SEND_ASSOCIATIONS = 16
MAX_RECEIVER_PROCESSES = 16  # node.receiver_processes


@dataclass
class Destination:
    """Where derived series and SEGs go: a DICOM AE (C-STORE) or a DICOMweb server (STOW-RS)."""

    name: str = ""
    kind: DestinationKind = "dimse"
    ae_title: str = ""  # dimse: the peer's AE title
    host: str = ""  # dimse: the peer's address
    port: int = 104  # dimse: the peer's port
    url: str = ""  # stow: DICOMweb base URL, e.g. http://pacs:8042/dicom-web
    token: str = ""  # stow: optional bearer token
    tls: bool = False  # dimse: associate over TLS, verifying the peer against ca (system CAs when empty)
    ca: str = ""  # dimse + tls: CA certificates (PEM) for the peer's certificate
    cert: str = ""  # dimse + tls: our client certificate (PEM) for peers that require one
    key: str = ""  # dimse + tls: its private key
    timeout_seconds: float = 60.0
    # dimse: associations opened at once for one job's files (each takes every n-th file). A durable
    # archive stores faster over several; a PACS that limits associations per caller wants 1
    associations: int = 1


@dataclass
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    viewer: ViewerConfig = field(default_factory=ViewerConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    destinations: list[Destination] = field(default_factory=list)


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
        if get_origin(want) is dict:
            setattr(obj, key, _table(get_args(want)[1], value, f"{where}.{key}"))
            continue
        item_type = _list_item_type(want)
        if item_type is not None:
            value = _list(item_type, value, f"{where}.{key}")
            setattr(obj, key, value)
            continue
        if get_origin(want) is Literal:
            if value not in get_args(want):
                choices = ", ".join(repr(c) for c in get_args(want))
                raise ConfigError(f"{where}.{key} must be one of {choices}, got {value!r}")
            setattr(obj, key, value)
            continue
        setattr(obj, key, _scalar(want, value, f"{where}.{key}"))


def _scalar(want: Any, value: Any, where: str) -> Any:
    """A plain setting's value, checked against its type (a whole number is taken for a float)."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want in (int, float, str, bool) and not isinstance(value, want):
        raise ConfigError(f"{where} must be {want.__name__}, got {value!r}")
    return value


def _table(value_type: Any, value: Any, where: str) -> dict[str, Any]:
    """A table of names to values ([engine.scanner_kernels]): any name, each value checked as a plain setting."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return {str(name): _scalar(value_type, v, f"{where}.{name}") for name, v in value.items()}


def _list_item_type(want: Any) -> Any:
    """The item type of a ``list[...]`` setting, or None for scalar settings."""
    if get_origin(want) is list:
        return get_args(want)[0]
    return None


def _list(item_type: Any, value: Any, where: str) -> list[Any]:
    """Arrays of tables ([[destinations]]) become lists of dataclasses, checked like any table."""
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be an array")
    out: list[Any] = []
    for i, v in enumerate(value):
        if is_dataclass(item_type):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}[{i}] must be a table")
            item = item_type()
            _apply(item, v, f"{where}[{i}]")
            out.append(item)
        else:
            if not isinstance(v, item_type):
                raise ConfigError(f"{where}[{i}] must be {item_type.__name__}")
            out.append(v)
    return out


def check(cfg: Config) -> None:
    """Cross-field checks for the node's settings; a bad destination fails at start, not at 3 a.m."""
    names = set()
    for i, d in enumerate(cfg.destinations):
        where = f"destinations[{i}]"
        if not d.name:
            raise ConfigError(f"{where}: name is required")
        if d.name in names:
            raise ConfigError(f"{where}: duplicate name {d.name!r}")
        names.add(d.name)
        if d.kind == "dimse":
            if not (d.ae_title and d.host and d.port):
                raise ConfigError(f"{where} ({d.name}): a dimse destination needs ae_title, host and port")
        elif d.kind == "stow":
            if not d.url:
                raise ConfigError(f"{where} ({d.name}): a stow destination needs url")
        else:  # only a Config built in code gets here: a file's kind is checked as it loads
            raise ConfigError(f"{where} ({d.name}): kind must be 'dimse' or 'stow', got {d.kind!r}")
        if bool(d.cert) != bool(d.key):
            raise ConfigError(f"{where} ({d.name}): cert and key go together")
        if d.tls and d.kind != "dimse":
            raise ConfigError(f"{where} ({d.name}): tls is for dimse destinations; a stow one uses an https:// url")
        if not 1 <= d.associations <= MAX_SEND_ASSOCIATIONS:
            raise ConfigError(f"{where} ({d.name}): associations must be 1 to {MAX_SEND_ASSOCIATIONS}, "
                              f"got {d.associations}")
    if not 1 <= cfg.node.receiver_processes <= MAX_RECEIVER_PROCESSES:
        raise ConfigError(f"node.receiver_processes must be 1 to {MAX_RECEIVER_PROCESSES}, "
                          f"got {cfg.node.receiver_processes}")
    if cfg.output.write_processes not in (1, 2):
        raise ConfigError(f"output.write_processes must be 1 or 2, got {cfg.output.write_processes}")
    for i, peer in enumerate(cfg.node.allowed):
        if not (peer.ae_title and peer.host):
            raise ConfigError(f"node.allowed[{i}]: ae_title and host are both required")
    tls = cfg.node.tls
    if tls.enabled:
        if not (tls.cert and tls.key):
            raise ConfigError("node.tls: enabled needs cert and key")
        if tls.require_client_cert and not tls.ca:
            raise ConfigError("node.tls: require_client_cert needs ca (the CA that signs the callers' certificates)")
        if tls.keep_plain and tls.port == cfg.node.port:
            raise ConfigError(f"node.tls.port and node.port are both {tls.port}; keep_plain needs two ports")
    if bool(cfg.http.cert) != bool(cfg.http.key):
        raise ConfigError("http: cert and key go together")
    if cfg.spool.durability not in ("journal", "posix"):
        raise ConfigError(f"spool.durability must be 'journal' or 'posix', got {cfg.spool.durability!r}")
    if cfg.jobs.workers < 1 or cfg.jobs.inference_slots < 1:
        raise ConfigError("jobs.workers and jobs.inference_slots must be at least 1")
    positive = {"node.max_connections": cfg.node.max_connections,
                "node.max_connections_per_host": cfg.node.max_connections_per_host,
                "node.request_seconds": cfg.node.request_seconds, "node.idle_seconds": cfg.node.idle_seconds,
                "http.max_body_mb": cfg.http.max_body_mb, "http.max_parts": cfg.http.max_parts,
                "http.max_connections": cfg.http.max_connections, "http.header_seconds": cfg.http.header_seconds,
                "jobs.memory_mb": cfg.jobs.memory_mb, "jobs.timeout_seconds": cfg.jobs.timeout_seconds,
                "jobs.max_crashes": cfg.jobs.max_crashes, "jobs.incomplete_seconds": cfg.jobs.incomplete_seconds}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0, got {value!r}")
    try:  # the engine's options check their own ranges (a blur's MTF50, a kernel table's names)
        cfg.engine.subtract_options()
        cfg.engine.detect_options()
    except ValueError as exc:
        raise ConfigError(f"engine: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"engine.{' / '.join(LEARNT_FILE_KEYS)}: cannot read {exc.filename!r}: "
                          f"{exc.strerror or exc}") from None
    if cfg.intake.max_sequence_depth < 0 or cfg.intake.max_element_mb < 0:
        raise ConfigError("intake.max_sequence_depth and intake.max_element_mb cannot be negative")


def from_dict(values: dict[str, Any]) -> Config:
    """A Config from the nested dictionary ``dataclasses.asdict`` makes of one (how a job's child process
    gets its parent's exact settings); checked like a file."""
    cfg = Config()
    _apply(cfg, values, "config")
    check(cfg)
    return cfg


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
    for key in LEARNT_FILE_KEYS:  # the learnt files, before the check, which reads them
        value = getattr(cfg.engine, key)
        setattr(cfg.engine, key, [_beside(p.parent, v) for v in value] if isinstance(value, list)
                else _beside(p.parent, value))
    check(cfg)
    model = Path(cfg.engine.model)
    if not model.is_absolute():
        cfg.engine.model = str((p.parent / model).resolve())
    spool = Path(cfg.spool.dir)
    if not spool.is_absolute():
        cfg.spool.dir = str((p.parent / spool).resolve())
    for holder in (cfg.node.tls, cfg.http, *cfg.destinations):  # certificates and keys, like the model
        for key in ("cert", "key", "ca"):
            if hasattr(holder, key):
                setattr(holder, key, _beside(p.parent, getattr(holder, key)))
    return cfg


# The [engine] keys that name learnt files (a path, or a list of paths for the companions): a relative one is taken
# from the config file's folder. One list, so that the loader, its refusal and the lab's config writer
# (experiment2v2._from_here) cannot miss a file added later.
LEARNT_FILE_KEYS = ("subtract_estimate", "subtract_companions", "subtract_dim_estimate", "detect_learnt")


def _beside(folder: Path, value: str) -> str:
    """A file the config names, a relative path taken from the config file's ``folder`` ("" stays unset)."""
    return value if not value or Path(value).is_absolute() else str((folder / value).resolve())
