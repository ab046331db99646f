"""Job isolation: each job's processing runs in a child process under a memory and a time limit.

One poisonous series must end as one failed job, not as a node that the kernel kills again
after every restart. The child reads the spooled series, runs the very pipeline of
``dicom-node process`` and writes its outcome as JSON; the parent watches its resident
memory and its clock and kills it past either limit. A child that dies (a segmentation
fault in a codec, the kernel's OOM killer, a limit) leaves the node, its other jobs and
its listeners untouched; the worker decides from the job's count of runs whether to try
again or to fail the job with the reason (see ``Workers.process``).

Run as ``python -m dicom_node.node.isolate REQUEST.json``: the request holds the whole
configuration, so the child processes with exactly the parent's settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.config import Config
from dicom_node.node.logs import ctx
from dicom_node.pipeline.process import die_with_parent

log = logging.getLogger("dicom_node.node.isolate")

POLL_SECONDS = 0.05  # how often the parent looks at the child's memory: a runaway grows ~1 GB/s at most here
STDERR_TAIL_BYTES = 8192  # what of a dead child's last words goes into the job's reason and the log


class ChildDiedError(Exception):
    """The child ended without an outcome: it crashed, or was killed for a limit. The message says which."""


class StoppedError(Exception):
    """The node is shutting down: the child was stopped, the job is handed back uncounted."""


@dataclass
class ChildRequest:
    """What one processing run needs; written as JSON for the child."""

    job_id: int
    series_uid: str
    series_dir: str
    out_dir: str
    backend: str  # the backend the parent selected (never "auto" again in each child)
    model_id: str
    config: dict[str, Any]
    pictures_dir: str = ""  # where the job page's lesion pictures go ("" = none)
    handed_at: float = 0.0  # wall time the job was handed over (a warm child reports how long it then waited)


@dataclass
class PrepareRequest:
    """A warm child's work ahead of a job (see :class:`WarmChild`): read, load and detect this series."""

    series_uid: str
    series_dir: str
    backend: str
    config: dict[str, Any]


def _resident_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _start_child(argument: str, err_path: Path, stdin: int) -> subprocess.Popen:
    """``python -m dicom_node.node.isolate ARGUMENT``, its output into ``err_path``, dying with its parent."""
    with err_path.open("wb") as err:
        return subprocess.Popen([sys.executable, "-m", "dicom_node.node.isolate", argument], stdin=stdin,
                                stdout=err, stderr=err, close_fds=True,
                                preexec_fn=die_with_parent)  # noqa: PLW1509 - one prctl, no locks taken


class WarmChild:
    """A processing child started ahead of its job: the interpreter is up and numpy, scipy, pydicom and
    ONNX Runtime are imported (about a second on this hardware, on every job) before the job exists.
    It waits for one request path on its stdin, processes it exactly as a cold child would, and exits;
    the worker starts the next one while it sends. Its log goes to its own file until it has a job.

    Before its job, it may be asked to *prepare* a series (``jobs.prepare_ahead``): when the
    association that brought a series is released, the series is complete only after
    ``jobs.release_grace_seconds``, and the child spends that grace reading the series, loading its
    volume and detecting the calcium. The job then uses that work only if the series' files are
    exactly those it read (names, sizes, modification times, inodes) and the settings are the same;
    otherwise it starts over. Preparing runs under the job's memory and time limits; a child that
    dies or is killed preparing costs nothing but the cold start of the job's own child.
    """

    def __init__(self, err_path: Path) -> None:
        self.err_path = err_path
        self.proc = _start_child(WAIT, err_path, subprocess.PIPE)
        self.prepared_for = ""  # the series it was asked to prepare ("" = none)
        self._prepare_path: Path | None = None  # the request file; the child removes it when it is done
        self._handed = threading.Event()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def preparing(self) -> bool:
        """Still working on its preparation (a job handed to it now would wait for the end of it)."""
        return self._prepare_path is not None and self._prepare_path.exists() and self.alive()

    def prepare(self, request: PrepareRequest, request_path: Path, memory_mb: int, timeout_seconds: float) -> None:
        """Ask the child to prepare a series; raises OSError if it died. Watched for the limits until it is
        handed its job (then ``run_child`` watches it)."""
        assert self.proc.stdin is not None
        request_path.write_text(json.dumps(dataclasses.asdict(request)))
        self._prepare_path = request_path
        try:
            self.proc.stdin.write(f"{PREPARE}{request_path}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            request_path.unlink(missing_ok=True)
            raise
        self.prepared_for = request.series_uid
        threading.Thread(target=self._watch, args=(memory_mb, timeout_seconds), name="prepare-watch",
                         daemon=True).start()

    def _watch(self, memory_mb: int, timeout_seconds: float) -> None:
        started = time.monotonic()
        while self.preparing() and not self._handed.is_set():
            rss = _resident_bytes(self.proc.pid)
            why = (f"memory past jobs.memory_mb = {memory_mb} MB ({rss / 2**20:.0f} MB resident)"
                   if rss > memory_mb * 1024 * 1024 else
                   f"still running after jobs.timeout_seconds = {timeout_seconds:g} s"
                   if time.monotonic() - started > timeout_seconds else "")
            if why:
                log.warning("preparing a series ahead of its job stopped: %s; the job starts a new child",
                            why, **ctx(series=self.prepared_for))
                with contextlib.suppress(OSError):
                    self.proc.kill()
                return
            time.sleep(POLL_SECONDS)

    def hand(self, request_path: Path) -> subprocess.Popen:
        """Give the child its one job; raises OSError if it died meanwhile (the caller starts a cold one)."""
        assert self.proc.stdin is not None
        self._handed.set()
        self.proc.stdin.write(f"{request_path}\n".encode())
        self.proc.stdin.close()
        return self.proc

    def discard(self) -> None:
        """Never used: closing its stdin ends it (one still preparing is killed: that would take seconds);
        its files go."""
        self._handed.set()
        if self.preparing():
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err_path.unlink(missing_ok=True)
        if self._prepare_path is not None:
            self._prepare_path.unlink(missing_ok=True)


WAIT = "--wait"  # the child's argument: import, then wait for a request path on stdin
PREPARE = "prepare "  # a warm child's stdin line before its job: prepare the series of this request file


def run_child(request: ChildRequest, prefix: Path, memory_mb: int, timeout_seconds: float,
              stop: threading.Event, warm: WarmChild | None = None) -> dict[str, Any]:
    """Run one processing job in a child process and return its outcome (the JSON it wrote).

    Raises ChildDiedError with a readable reason when the child crashes or is killed for a limit, and
    StoppedError when ``stop`` is set while it runs. The child's log lines are passed on to ours. Its files
    are ``prefix`` + ``.request.json``, ``.outcome.json`` and ``.stderr``, removed when it is done. A
    ``warm`` child, if still alive, takes the job instead of a new one (its log file replaces ``.stderr``).
    """
    req_path, result_path, err_path = (prefix.with_name(prefix.name + ext) for ext in
                                       (".request.json", ".outcome.json", ".stderr"))
    result_path.unlink(missing_ok=True)
    req_path.write_text(json.dumps(dataclasses.asdict(request)))
    limit = memory_mb * 1024 * 1024
    proc = None
    if warm is not None:
        try:
            if warm.alive():
                proc, err_path = warm.hand(req_path), warm.err_path
        except OSError:  # it died between the check and the hand-over
            proc = None
        if proc is None:
            warm.discard()
    if proc is None:
        proc = _start_child(str(req_path), err_path, subprocess.DEVNULL)
    started = time.monotonic()
    peak = 0
    killed_for = ""
    try:
        while proc.poll() is None:
            peak = max(peak, _resident_bytes(proc.pid))
            if peak > limit:
                killed_for = (f"killed: its memory grew past jobs.memory_mb = {memory_mb} MB "
                              f"({peak / 2**20:.0f} MB resident)")
            elif time.monotonic() - started > timeout_seconds:
                killed_for = f"killed: still running after jobs.timeout_seconds = {timeout_seconds:g} s"
            elif stop.is_set():
                killed_for = "stopped"
            if killed_for:
                proc.kill()
                proc.wait()
                break
            time.sleep(POLL_SECONDS)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:  # an exception of our own while watching: never leave it running
            proc.kill()
            proc.wait()
    tail = _relay_and_tail(err_path)
    req_path.unlink(missing_ok=True)
    outcome_text = result_path.read_text() if proc.returncode == 0 and result_path.is_file() else None
    result_path.unlink(missing_ok=True)
    if killed_for == "stopped" or (outcome_text is None and stop.is_set()):
        # A child that died while the node stops died of the stop (a swapped warm child goes with the worker
        # thread that started it, PDEATHSIG): the job goes back uncounted, never as a crash.
        raise StoppedError("the node is shutting down")
    if killed_for:
        raise ChildDiedError(killed_for)
    if outcome_text is not None:
        outcome = json.loads(outcome_text)
        outcome["peak_mb"] = round(peak / 2**20)
        outcome["child_seconds"] = round(ended - started, 3)  # the worker splits it into stages
        return outcome
    how = (f"crashed ({_signal_name(proc.returncode)})" if proc.returncode < 0
           else f"exited with status {proc.returncode} and no outcome")
    last = tail.strip().splitlines()[-1][:300] if tail.strip() else ""
    raise ChildDiedError(f"{how}{': ' + last if last else ''}")


def _relay_and_tail(err_path: Path) -> str:
    """Pass the child's log lines (JSON, as ours) on to our stderr, and return its last words."""
    try:
        size = err_path.stat().st_size
        with err_path.open("rb") as f:
            if size <= 1 << 20:  # a normal run's log: relay it whole
                sys.stderr.write(f.read().decode("utf-8", "replace"))
                sys.stderr.flush()
            f.seek(max(0, size - STDERR_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
        if size > 1 << 20:  # a runaway's: only the end, and say so
            log.error("processing child wrote %d bytes to stderr; its last lines: %s", size, tail[-2000:])
        err_path.unlink(missing_ok=True)
        return tail
    except OSError:
        return ""


# ---- the child ------------------------------------------------------------------------------------


def series_state(folder: str | Path) -> list[tuple[str, int, int, int]]:
    """What a series folder holds, as far as a preparation ahead of the job must know: each entry's name,
    size, modification time and inode (the spool replaces a file by renaming a new one over it)."""
    with os.scandir(folder) as entries:
        return sorted((e.name, st.st_size, st.st_mtime_ns, st.st_ino) for e in entries for st in [e.stat()])


@dataclass
class Prepared:
    """A warm child's work ahead of its job: the series read, its volume loaded, the calcium detected."""

    request: PrepareRequest
    state: list[tuple[str, int, int, int]]
    series: Any  # pipeline.series.Series
    engine: Any  # pipeline.restore.Engine
    volume: Any  # numpy float32 HU volume
    detection: Any  # pipeline.detect.Detection
    stages: dict[str, float]

    def fits(self, req: ChildRequest) -> bool:
        """Whether the job is exactly what was prepared: the same folder with the same files, the same settings."""
        return (req.series_dir == self.request.series_dir and req.config == self.request.config
                and req.backend == self.request.backend and series_state(req.series_dir) == self.state)


def _read_series(series_dir: str, cfg: Config) -> tuple[list, list[str]]:
    """The spooled series, read under the node's [intake] limits: the one way a job (or its preparation) reads it."""
    from dicom_node.pipeline.series import read_ct_series

    return read_ct_series([series_dir], max_depth=cfg.intake.max_sequence_depth,
                          max_element_mb=cfg.intake.max_element_mb, refused=cfg.intake.refuse_image_types)


def _engine(backend_name: str, cfg: Config) -> Any:
    """The job's engine on the backend the parent selected (a pipeline.restore.Engine)."""
    from dicom_node.backends.select import select
    from dicom_node.pipeline.process import build_engine

    backend, _ = select(backend_name, cfg.engine.model, cfg.engine.threads, cfg.engine.batch)
    return build_engine(cfg, backend)


def _prepare(request_path: Path) -> Prepared | None:
    """Read, load and detect ahead of the job; None when that cannot be used (the job then does it all and
    says why it fails, if it does). The request file is removed at the end: that tells the worker it is done."""
    from dicom_node.config import from_dict
    from dicom_node.pipeline.detect import detect
    from dicom_node.pipeline.process import check_resolution, timed
    from dicom_node.pipeline.series import load_hu

    stages: dict[str, float] = {}
    req = None
    try:
        req = PrepareRequest(**json.loads(request_path.read_text()))
        cfg = from_dict(req.config)
        before = series_state(req.series_dir)
        with timed(stages, "read"):
            series_list, _ = _read_series(req.series_dir, cfg)
        if not series_list or check_resolution(series_list[0], cfg):
            return None
        with timed(stages, "model"):
            engine = _engine(req.backend, cfg)
        with timed(stages, "load"):
            volume = load_hu(series_list[0])
        with timed(stages, "detect"):
            # the options the engine's own run gives this series' kernel (the kernel table's blur for the
            # sharpened-image test): a head start must detect what the job itself would
            detection = detect(volume, series_list[0].spacing, engine.detect_options_for(series_list[0].kernel))
        if series_state(req.series_dir) != before:  # an instance arrived meanwhile: the job starts over
            return None
        log.info("prepared ahead of the job: %s", ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()),
                 **ctx(series=req.series_uid))
        return Prepared(req, before, series_list[0], engine, volume, detection, stages)
    except Exception as exc:  # noqa: BLE001 - only ever a head start: the job itself meets and reports any error
        log.info("nothing prepared ahead (%s: %s); the job starts from the files", exc.__class__.__name__,
                 str(exc)[:200], **ctx(series=req.series_uid if req else None))
        return None
    finally:
        request_path.unlink(missing_ok=True)


def _child(request_path: Path, held: list[Prepared] | None = None) -> int:
    """One job. ``held``: a warm child's preparation, if any, handed over in a list that this function
    empties, so that no caller's frame keeps a volume the job cannot use alive through the job."""
    t0 = time.perf_counter()
    from dicom_node.config import from_dict
    from dicom_node.node.logs import setup
    from dicom_node.pipeline.process import process_series, timed

    setup()
    stages = {"imports": round(time.perf_counter() - t0, 3)}  # numpy, scipy, pydicom, onnxruntime: every run pays it
    req = ChildRequest(**json.loads(request_path.read_text()))
    prepared = held.pop() if held else None
    if req.handed_at and prepared is not None:  # the job waited in the pipe while the preparation ran
        stages["ahead_wait"] = round(max(0.0, time.time() - req.handed_at), 3)
    ahead = prepared if prepared is not None and prepared.fits(req) else None
    if prepared is not None and ahead is None:
        log.info("the series changed since it was prepared ahead: the job starts from the files",
                 **ctx(req.job_id, req.series_uid))
    prepared = None  # what does not fit is freed now: the job needs the memory
    cfg: Config = from_dict(req.config)
    result_path = request_path.with_name(request_path.name.replace(".request.json", ".outcome.json"))
    outcome: dict[str, Any]
    try:
        if ahead is not None:
            series_list, notes = [ahead.series], []
            stages.update({f"ahead_{k}": v for k, v in ahead.stages.items()})
        else:
            with timed(stages, "read"):
                series_list, notes = _read_series(req.series_dir, cfg)
        if not series_list:
            shown = "; ".join(notes[:5]) + (f"; and {len(notes) - 5} more" if len(notes) > 5 else "")
            outcome = {"status": "refused", "reason": shown or "no instances in the spool"}
        else:
            if ahead is not None:
                engine = ahead.engine
            else:
                with timed(stages, "model"):
                    engine = _engine(req.backend, cfg)
            result = process_series(series_list[0], Path(req.out_dir), cfg, engine, req.model_id,
                                    cfg.output.write_seg, pictures_dir=Path(req.pictures_dir) if req.pictures_dir
                                    else None, ahead=(ahead.volume, ahead.detection) if ahead else None)
            ahead = None
            result.stages = {**stages, **result.stages}
            outcome = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
            outcome["outputs"] = [str(p) for p in result.outputs]
    except Exception as exc:  # noqa: BLE001 - an error is an outcome with a reason; only a crash is not
        from dicom_node.node.worker import disk_full

        # A deep recursion's traceback is itself a runaway: its message is enough.
        log.error("processing failed: %s: %s", exc.__class__.__name__, str(exc)[:500],
                  exc_info=not isinstance(exc, (RecursionError, MemoryError)), **ctx(req.job_id, req.series_uid))
        outcome = {"status": "disk_full" if disk_full(exc) else "failed",
                   "reason": f"{exc.__class__.__name__}: {str(exc)[:500]}"}
    log.info("processing child finished: %s", outcome["status"], **ctx(req.job_id, req.series_uid))
    tmp = result_path.with_suffix(".part")
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, result_path)
    return 0


def _main(argv: list[str]) -> int:
    """A cold child gets its request path as its argument; a warm one (``--wait``) imports first, then
    reads lines from stdin: any number of ``prepare`` requests (each replaces the last), then its job's
    request path (an empty stdin: the worker no longer needs it)."""
    if argv[0] != WAIT:
        return _child(Path(argv[0]))
    import dicom_node.pipeline.process  # noqa: F401 - the point of a warm child: imported before the job
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401
    from dicom_node.node.logs import setup

    setup()
    held: list[Prepared] = []  # the last preparation, if it can be used
    while line := sys.stdin.readline().strip():
        if not line.startswith(PREPARE):
            return _child(Path(line), held)
        held.clear()  # the last preparation's memory goes before the next one takes its own
        prepared = _prepare(Path(line[len(PREPARE):]))
        if prepared is not None:
            held.append(prepared)
        del prepared
    return 0


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    # The outcome is written and the log flushed: skip the interpreter's teardown (freeing the volume, the
    # model's session), half a second of every job spent after the result exists.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
