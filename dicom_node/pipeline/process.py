"""The whole offline pipeline for CT series on disk: assemble → detect → plan → infer → write.

``dicom-node process`` and the server's workers both call :func:`process_series`,
so the offline command is exactly what runs in production.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.backends import Backend
from dicom_node.backends.select import model_id as model_file_id
from dicom_node.config import Config
from dicom_node.pipeline.derived import (
    DerivedOptions,
    series_shared,
    source_uids,
    write_derived_series,
    write_multiframe,
)
from dicom_node.pipeline.detect import Detection, DetectOptions
from dicom_node.pipeline.pictures import lesion_pictures, thumbnail
from dicom_node.pipeline.report import patient_position, write_report
from dicom_node.pipeline.restore import METHOD_TEXT, Engine, EngineResult, auto_choice
from dicom_node.pipeline.seg import write_seg
from dicom_node.pipeline.series import Series, load_hu, read_ct_series
from dicom_node.pipeline.subtract import SubtractOptions

log = logging.getLogger(__name__)
PICTURE_PIXEL_MM = 0.1  # 200 px panels for a 20 mm view: big enough to judge a lumen on the job page


@dataclass
class SeriesOutcome:
    uid: str
    description: str
    status: str  # done | skipped | failed
    reason: str = ""
    slices: int = 0
    lesions: int = 0
    windows: int = 0
    voxels_changed: int = 0
    excluded: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    derived_series_uid: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # what it ran with: the model and the [engine] keys
    regions: list[dict[str, Any]] = field(default_factory=list)  # one row per restored region
    # the job's lesion table: one row per lesion, its region's restoration and confidence, and its picture
    lesion_table: list[dict[str, Any]] = field(default_factory=list)
    # seconds per stage, in the order they ran (the job's timings: where the time from queue to result goes)
    stages: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if self.status != "done":
            return f"{self.status}: {self.description or '(no description)'} [{self.uid}]: {self.reason}"
        extra = f"; left alone: {', '.join(e['reason'] for e in self.excluded)}" if self.excluded else ""
        return (f"done: {self.description or '(no description)'} [{self.uid}]: {self.slices} slices, "
                f"{self.lesions} lesions, {self.windows} windows, {self.voxels_changed} voxels changed, "
                f"{self.seconds:.1f} s, {len(self.outputs)} files{extra}{self._unsure()}{self._estimates()}")

    def _unsure(self) -> str:
        unsure = [r for r in self.regions if r.get("unsure")]
        return f"; {len(unsure)} unsure ({unsure[0]['action']})" if unsure else ""

    def _estimates(self) -> str:
        """How many regions each learnt estimate restored, where several ran (subtract_companions)."""
        named = Counter(r["estimate"] for r in self.regions if r.get("estimate"))
        return "; regions by estimate: " + ", ".join(f"{k} {n}" for k, n in sorted(named.items())) if named else ""


@contextmanager
def timed(stages: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the seconds the block took to ``stages[stage]``: the per-stage split that tells an operator
    (and the latency benchmark) where a job's processing time goes."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[stage] = round(stages.get(stage, 0.0) + time.perf_counter() - t0, 3)


def build_engine(cfg: Config, backend: Backend) -> Engine:
    return Engine(backend, cfg.engine.detect_options(), cfg.engine.window_options(), cfg.engine.confidence_options(),
                  cfg.engine.method, cfg.engine.subtract_options())


def engine_id(cfg: Config, kernel: str | None = None) -> str:
    """What made the output, for its UIDs, equipment and job records: the model file, or the subtraction.

    Derived UIDs hang on this, so the same series processed by another method (or other
    subtraction or detection settings) gets other UIDs, never a silent replacement of the first result.
    Under ``method = "auto"`` a series' output is made by what auto chooses for its ``kernel``
    (``Engine.method_for``); without a kernel, the node's id names both (job records, fingerprints).
    """
    method, options = cfg.engine.method, None
    if method == "auto" and kernel is not None:  # what auto chooses for this series (``Engine.method_for``)
        options = cfg.engine.subtract_options()
        method = auto_choice(options, kernel)
    detector = cfg.engine.detect_options()
    if cfg.engine.method == "auto" and method == "network":
        # what the series' detection runs (``Engine.detect_options_for``): a series auto gives the network is not
        # sharpened, so settings of the sharpened image alone change none of its voxels and must not rename it
        detector = detector.without_sharpening()
    made = _engine_id(cfg, method, options)
    # the detection's rules decide which voxels are restored too: settings other than the defaults name the
    # output (the defaults add nothing, so the ids of outputs made with them stand)
    rules = dataclasses.replace(detector, learnt=None)
    if rules != DetectOptions():
        made += f"-rules-{hashlib.sha256(_rules_described(rules).encode()).hexdigest()[:8]}"
    if detector.learnt is None:
        return made
    # a learnt detector decides which voxels are restored: its file and settings name the output too
    named = f"{detector.learnt.digest}+{detector.probability()}+{detector.learnt_min_volume_mm3}"
    if detector.learnt_mode != "decide":  # the first files named "decide" without saying so: their ids stand
        named += f"+{detector.learnt_mode}"
    return f"{made}-detect-{hashlib.sha256(named.encode()).hexdigest()[:8]}"


def _rules_described(rules: DetectOptions) -> str:
    """The detection's rules as an output's id hashes them: their repr, less the beyond-the-bloom noise test's fields
    while it is off, so the outputs made before those fields existed keep their ids."""
    text = repr(rules)
    if rules.noise_away_mm == 0.0:
        text = text.replace(f", noise_away_mm=0.0, noise_away_min_mm3={rules.noise_away_min_mm3!r}", "")
    return text


def _described(options: SubtractOptions) -> str:
    """The subtraction's options as its output's id hashes them: their repr, less the dim-lumen estimate's fields
    while they are at their defaults (None, 0), so the outputs made before those fields existed keep their ids."""
    text = repr(options)
    if options.dim_learnt is None and options.dim_below_hu == 0.0:
        text = text.replace(", dim_learnt=None, dim_below_hu=0.0", "")
    return text


def _engine_id(cfg: Config, method: str, options: SubtractOptions | None) -> str:
    """:func:`engine_id` without the detection: what restored the series (``method``, auto's choice for it where
    it has a kernel) and the subtraction's options where they were built for that choice."""
    if method == "network":  # the model file alone: no subtraction settings to build
        return model_file_id(cfg.engine.model)
    options = cfg.engine.subtract_options() if options is None else options
    subtract = "subtract-" + hashlib.sha256(_described(options).encode()).hexdigest()[:10]
    if method == "subtract":
        return subtract
    return "auto-" + hashlib.sha256(f"{model_file_id(cfg.engine.model)}+{subtract}".encode()).hexdigest()[:10]


def run_settings(cfg: Config, model_id: str) -> dict[str, Any]:
    """The settings a run used, as its outcome carries them: the model and every [engine] setting that
    shapes the output (not where the model file lies, nor threads and batch, which change no voxel)."""
    engine = {k: v for k, v in dataclasses.asdict(cfg.engine).items()
              if k not in ("model", "threads", "batch", "backend")}
    return {"model": model_id, **engine}


def check_resolution(series: Series, cfg: Config) -> str | None:
    dz, dy, dx = series.spacing
    if max(dy, dx) > cfg.engine.max_pixel_mm or dz > cfg.engine.max_slice_mm:
        return (f"resolution too coarse for coronary work: {max(dy, dx):.2f} mm pixels, {dz:.2f} mm slices "
                f"(needs at most {cfg.engine.max_pixel_mm} mm and {cfg.engine.max_slice_mm} mm)")
    return None


def lesion_table(series: Series, result: EngineResult, pictures: dict[int, str]) -> list[dict[str, Any]]:
    """One row per lesion for the job page and GET /jobs/{id}: where it is (patient mm), how big and how
    bright it was, what its region's restoration did and how sure it was, and its picture's file name."""
    regions = {lesion: r for r in result.reports for lesion in r.lesions}
    rows = []
    for lesion in result.detection.lesions:
        r = regions.get(lesion.index)
        # the region's columns as the region report gives them (RegionReport.as_dict); a lesion no region
        # reached was not restored
        reg = r.as_dict() if r else {"region": None, "voxels": 0, "disagreement_hu": None, "measure": None,
                                     "unsure": False, "action": "not restored", "lumen_kept": 0,
                                     "vessel_mm": None, "lumen_hu": None, "why": [], "estimate": "",
                                     "enclosure": None}
        rows.append({"lesion": lesion.index, "region": reg["region"],
                     "position_mm": [round(v, 1) for v in patient_position(series, lesion.centroid)],
                     "volume_mm3": round(lesion.volume_mm3, 2), "peak_hu": round(lesion.peak_hu, 1),
                     **{k: reg[k] for k in ("voxels", "disagreement_hu", "measure", "unsure", "action",
                                            "lumen_kept", "vessel_mm", "lumen_hu", "why", "estimate",
                                            "enclosure")},
                     "picture": pictures.get(lesion.index)})
    return rows


def original_slices(series: Series) -> Callable[[int, int], np.ndarray]:
    """Reads the source's HU slices [z0, z1) again: the engine restored the volume in place, and the
    pictures need the original only around each lesion, not a second copy of the whole series."""
    return lambda z0, z1: load_hu(series, z0, z1)


def process_series(series: Series, out_dir: Path, cfg: Config, engine: Engine, model_id: str,
                   write_seg_file: bool = True, progress: Callable[[int, int], None] | None = None,
                   pictures_dir: Path | None = None, ahead: tuple[np.ndarray, Detection] | None = None,
                   ) -> SeriesOutcome:
    """Process one assembled series; failures come back as a readable outcome, not an exception.

    With ``pictures_dir``, also draws each lesion's picture there (for the node's job page; never
    sent anywhere) and a thumbnail of the first (``thumb.png``). ``ahead``: the series' HU volume
    and its detection, already done (a warm child's preparation, see node/isolate.py); the volume
    is restored in place."""
    if cfg.engine.method == "auto":  # this series' output is the chosen method's, and named so
        model_id = engine_id(cfg, series.kernel)
    outcome = SeriesOutcome(uid=series.uid, description=series.description, status="failed", slices=len(series.files),
                            settings=run_settings(cfg, model_id))
    t0 = time.perf_counter()
    reason = check_resolution(series, cfg)
    if reason:
        outcome.status, outcome.reason = "skipped", reason
        return outcome
    stages = outcome.stages
    if ahead is None:
        with timed(stages, "load"):
            volume = load_hu(series)
        result = engine.run(volume, series.spacing, progress=progress, kernel=series.kernel)
    else:
        volume, detection = ahead
        result = engine.restore(volume, series.spacing, detection, progress, kernel=series.kernel)
    stages.update({name: round(seconds, 3) for name, seconds in result.seconds.items()})
    det = result.detection
    outcome.lesions = len(det.lesions)
    outcome.windows = result.windows
    outcome.voxels_changed = int(result.changed.sum())
    outcome.regions = [r.as_dict() for r in result.reports]
    for r in result.reports:
        if r.unsure:
            log.warning("region %d (lesions %s): restoration unsure (%s); %s", r.region, r.lesions,
                        "; ".join(r.why), r.action)
    outcome.excluded = det.excluded
    found = f"above {det.threshold_hu:.0f} HU" + (f" or {cfg.engine.local_contrast_hu:.0f} HU above their vessel's "
                                                  "contrast" if cfg.engine.local_contrast_hu > 0 else "")
    text = METHOD_TEXT[result.method]  # as engine_id, the SEG and the run's settings say it
    if cfg.engine.method == "auto":
        outcome.settings["method_used"] = result.method
        listed = result.method == "subtract"
        log.info("method auto: kernel %s %s [engine.scanner_kernels]: %s",
                 repr(series.kernel) if series.kernel else "(not stated)", "is in" if listed else "is not in",
                 "the subtraction" if listed else "the network")
    description = (f"Calcium removed by {text.words} (dicom-node, {model_id}): {outcome.lesions} "
                   f"calcified lesions {found} replaced, with a {cfg.engine.margin_mm} mm blooming "
                   f"margin, by {text.restored_by}, research use; read with the original series.")
    if result.assumed_mtf50_lp_cm is not None:  # the one assumption the subtraction's result hangs on
        outcome.settings["assumed_mtf50_lp_cm"] = result.assumed_mtf50_lp_cm
        outcome.settings["assumed_edge_enhance"] = result.assumed_edge_enhance
        tables = engine.subtract
        if (tables.kernels or tables.enhance_by_kernel) and not tables.lists(series.kernel):
            # A site that measured its kernels meets one it did not (a new protocol, another scanner): the
            # default blur may be far from this kernel's, and the administrator should hear of it.
            outcome.settings["kernel_listed"] = False
            log.warning("kernel %s is not in the site's kernel tables ([engine.scanner_kernels], "
                        "[engine.scanner_edge_enhance]): the default blur is assumed (MTF50 %g lp/cm, edge lift %g); "
                        "measure it with dicom-node measure-kernel", repr(series.kernel) if series.kernel
                        else "(not stated)", result.assumed_mtf50_lp_cm, result.assumed_edge_enhance)
        chosen = result.assumed_for_kernel
        description += (f" Scanner blur assumed: MTF50 {result.assumed_mtf50_lp_cm:g} lp/cm, edge lift "
                        f"{result.assumed_edge_enhance:g} ({'for kernel ' + chosen if chosen else 'the default'}). "
                        + engine.subtract.estimate_text())
    uids = source_uids(series, model_id)
    target = out_dir / uids["series"]
    outcome.derived_series_uid = uids["series"]
    options = DerivedOptions(series_number_offset=cfg.output.series_number_offset,
                             institution_name=cfg.output.institution_name or None,
                             station_name=cfg.output.station_name or None)
    shared = series_shared(model_id, description)
    seg_number = int(getattr(series.headers[0], "SeriesNumber", 0) or 0) + cfg.output.series_number_offset + 1
    n = len(series.files)
    draw = pictures_dir is not None and bool(det.lesions)

    def derived(slices: range) -> list[Path]:
        return write_derived_series(series, volume, result.changed, target, model_id, description, options, shared,
                                    slices)

    def pictures() -> dict[int, str]:
        return _pictures(series, volume, result, pictures_dir) if draw and pictures_dir is not None else {}

    def seg_and_report(steps: dict[str, float]) -> list[Path]:
        return _seg_and_report(series, result, cfg, target, model_id, uids, seg_number, write_seg_file, steps)

    if cfg.output.write_processes > 1 and n >= MIN_SPLIT_SLICES and hasattr(os, "fork"):
        # Two processes: a forked copy writes the first part of the slices and draws the pictures while
        # this one writes the rest, the SEG and the report. pydicom's encoding holds the GIL, so threads
        # could not do this; the copy shares the volume copy-on-write and only reads it.
        cut = n * 3 // 5
        with timed(stages, "write"):
            first = in_forked_process(lambda: {"paths": [str(p) for p in derived(range(cut))],
                                               "pictures": pictures()})
            try:
                rest = derived(range(cut, n))
                more = seg_and_report({})  # inside "write": the two processes' work overlaps
            finally:
                copy = first()  # always waited for: never a stray writer, nor a zombie
        outcome.outputs = [Path(p) for p in copy["paths"]] + rest
        drawn = {int(k): v for k, v in copy["pictures"].items()}
    else:
        with timed(stages, "write"):
            outcome.outputs = derived(range(n))
        more = seg_and_report(stages)
        drawn = {}
        if draw:
            with timed(stages, "pictures"):
                drawn = pictures()
    if cfg.output.multiframe:
        with timed(stages, "multiframe"):
            outcome.outputs.append(write_multiframe(series, outcome.outputs, target, model_id, uids, description,
                                                    seg_number + 1))
    outcome.outputs += more
    outcome.lesion_table = lesion_table(series, result, drawn)
    outcome.status = "done"
    outcome.seconds = time.perf_counter() - t0
    return outcome


MIN_SPLIT_SLICES = 32  # below this a second writer process costs more than it saves


def _seg_and_report(series: Series, result: EngineResult, cfg: Config, target: Path, model_id: str,
                    uids: dict[str, str], seg_number: int, write_seg_file: bool, stages: dict[str, float],
                    ) -> list[Path]:
    """The SEG of what was removed and, with lesions, the TID 1500 report that points into it."""
    det = result.detection
    if not (write_seg_file and det.calcium.any()):
        return []
    params = {"threshold_hu": f"{det.threshold_hu:.0f}", "local_contrast_hu": f"{cfg.engine.local_contrast_hu:.0f}",
              "local_extent_hu": f"{cfg.engine.local_extent_hu:.0f}", "margin_mm": f"{cfg.engine.margin_mm}",
              "core": str(cfg.engine.core)}
    unsure = np.zeros(det.calcium.shape, bool)
    for r in result.reports:
        if r.unsure and det.labels is not None:
            for lesion in r.lesions:
                unsure |= det.labels == lesion
    with timed(stages, "seg"):
        seg_path = write_seg(series, det.calcium, result.changed, target, model_id, uids, params, seg_number,
                             unsure=unsure, reports=result.reports, method=result.method)
    out = [seg_path]
    if cfg.output.write_report and det.lesions:
        with timed(stages, "report"):
            out.append(write_report(series, det, result.reports, seg_path, target, model_id, uids, seg_number + 2))
    return out


def _pictures(series: Series, volume: np.ndarray, result: EngineResult, pictures_dir: Path) -> dict[int, str]:
    """Each lesion's picture for the job page (and a thumbnail of the first): lesion -> file name. Pictures
    are for people: when they fail, the job goes on without them."""
    t0 = time.perf_counter()
    try:
        made = lesion_pictures(original_slices(series), volume, result.changed, result.detection, series.spacing,
                               pictures_dir, pixel_mm=PICTURE_PIXEL_MM)
        if made:
            thumbnail(made[0].path, pictures_dir / "thumb.png")
    except Exception:  # noqa: BLE001 - the derived series must not wait on them
        log.exception("lesion pictures failed; the job goes on without them")
        return {}
    log.info("%d lesion pictures in %.1f s", len(made), time.perf_counter() - t0)
    return {pic.lesion: pic.path.name for pic in made}


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process, first thing: the kernel kills it when its parent (strictly: the thread that
    started it) dies, so no orphan keeps running and writing into a spool or an output folder. Used for
    the node's processing children (before exec) and for the forked writer."""
    import signal

    with contextlib.suppress(OSError, AttributeError):  # not Linux: the child may outlive its parent
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def in_forked_process(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` now in a forked copy of this process; returns a function that waits for it and gives
    its result (anything JSON can carry) or raises the copy's error: an OSError with its errno (a full disk
    must still read as one), anything else as RuntimeError.

    The copy dies with this process (a processing child killed for a limit takes its writer with it),
    leaves through ``os._exit`` (no atexit handlers, no second flush of inherited buffers) and shares
    everything else copy-on-write.
    """
    import json

    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy
        code = 0
        try:
            os.close(read_end)
            die_with_parent()
            if os.getppid() != parent:  # the parent died before the prctl took hold
                os._exit(1)
            payload = json.dumps({"result": fn()})
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as a message
            payload = json.dumps({"error": f"{exc.__class__.__name__}: {exc}",
                                  "errno": exc.errno if isinstance(exc, OSError) else None})
            code = 1
        try:
            with os.fdopen(write_end, "w") as f:
                f.write(payload)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)

    def wait() -> Any:
        with os.fdopen(read_end) as f:
            text = f.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            raise RuntimeError(f"the second writer process ended without a result (wait status {status})")
        answer = json.loads(text)
        if "error" in answer:
            why = f"the second writer process failed: {answer['error']}"
            if answer.get("errno"):  # e.g. a full disk: the worker hands the job back instead of failing it
                raise OSError(answer["errno"], why)
            raise RuntimeError(why)
        return answer["result"]

    return wait


def process_inputs(inputs: list[str | Path], out_dir: Path, cfg: Config, engine: Engine, model_id: str,
                   write_seg_file: bool = True,
                   progress_factory: Callable[[Series], Callable[[int, int], None]] | None = None,
                   ) -> tuple[list[SeriesOutcome], list[str]]:
    """Every CT series under the inputs; notes say what was skipped at the file level."""
    series_list, notes = read_ct_series(inputs, max_depth=cfg.intake.max_sequence_depth,
                                        max_element_mb=cfg.intake.max_element_mb,
                                        refused=cfg.intake.refuse_image_types)
    outcomes = []
    for s in series_list:
        progress = progress_factory(s) if progress_factory else None
        try:
            outcomes.append(process_series(s, out_dir, cfg, engine, model_id, write_seg_file, progress))
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop the others
            log.exception("series %s failed", s.uid)
            outcomes.append(SeriesOutcome(uid=s.uid, description=s.description, status="failed",
                                          reason=f"{exc.__class__.__name__}: {exc}", slices=len(s.files)))
    return outcomes, notes
