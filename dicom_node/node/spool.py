"""The spool: received instances and derived outputs on local disk, written durably.

A C-STORE is only answered with success once the instance would survive a power cut:
written to a temporary file, renamed into place atomically, and made durable. Each
fsync costs a journal commit (about 4 ms on a virtual disk), and an association's
instances arrive one after another, so the number of commits per instance decides
ingest speed:

- "journal" (default): write, rename, then fsync the file. On Linux's journaling file
  systems (ext4, XFS, btrfs) the rename also changes the file's inode, so that one
  commit makes both the data and the new name durable.
- "posix": fsync the file, rename, then fsync the directory: portable, two commits.

Several hosts may share one spool (``Spool(shared=True)``, when the job store is shared):
every host mounts it at the same path (jobs record their outputs' paths), and its file
system must make a rename atomic within a directory and an fsync durable before it
returns (NFS: a hard, ``sync`` mount; local file systems and most cluster file systems
do). The node's storage is this class's methods (write an instance, list a series, the
output and picture folders, remove, quarantine): an object store can take its place
behind the same methods. On a shared spool, a starting host removes only its own
leftovers (``tmp/`` names carry the host and process) and other hosts' that are hours old.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


class SpoolFullError(OSError):
    """Free space fell below the configured floor; answer out-of-resources, keep running."""


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID: the UID itself when it is well formed, else its hash."""
    if _UID.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


class Spool:
    """``series/<series>/<sop>.dcm`` for input, ``out/<job>/`` for outputs, ``pictures/<job>/`` for the job
    page's lesion pictures (kept after delivery: small, and what an operator looks at), ``tmp/`` for
    partial writes, ``quarantine/`` for what was refused or failed, each with the reason beside it."""

    def __init__(self, root: str | Path, min_free_mb: int = 0, durability: str = "journal",
                 quarantine_mb: int = 0, shared: bool = False) -> None:
        if durability not in ("journal", "posix"):
            raise ValueError(f"spool durability must be 'journal' or 'posix', not {durability!r}")
        self.posix = durability == "posix"
        self.root = Path(root)
        self.min_free = int(min_free_mb) * 1024 * 1024
        for sub in ("series", "out", "pictures", "tmp", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._counter = 0
        self._lock = threading.Lock()
        self.quarantine_cap = int(quarantine_mb) * 1024 * 1024  # 0 = no cap
        self._refused_bytes = sum(_footprint(f.stat().st_size) for f in self.refused_dir.rglob("*") if f.is_file()) \
            if self.refused_dir.is_dir() else 0
        # Leftovers of writes interrupted by a crash were never acknowledged: drop them (on a shared spool,
        # only those of this host's dead processes, and anyone's that are hours old).
        for leftover in (self.root / "tmp").iterdir():
            if shared and not _stale(leftover):
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    @property
    def refused_dir(self) -> Path:
        return self.root / "quarantine" / "refused"

    @property
    def db_path(self) -> Path:
        return self.root / "jobs.sqlite"

    def series_dir(self, series_uid: str) -> Path:
        return self.root / "series" / safe_name(series_uid)

    def out_dir(self, job_id: int) -> Path:
        return self.root / "out" / str(job_id)

    @property
    def pictures_root(self) -> Path:
        return self.root / "pictures"

    def pictures_dir(self, job_id: int) -> Path:
        return self.pictures_root / str(job_id)

    def tmp_path(self, name: str) -> Path:
        """A partial write's place in ``tmp/``, named after this host and process (see :func:`_stale`)."""
        return self.root / "tmp" / tmp_name(name)

    def instance_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(series_uid) / f"{safe_name(sop_uid)}.dcm"

    def check_space(self) -> None:
        if self.min_free and shutil.disk_usage(self.root).free < self.min_free:
            raise SpoolFullError(f"less than {self.min_free // (1024 * 1024)} MB free in {self.root}")

    def write_instance(self, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one Part-10 instance durably; a re-sent instance replaces the earlier copy."""
        self.check_space()
        target_dir = self.series_dir(series_uid)
        if not target_dir.is_dir():  # a stat per instance: survives folders removed behind our back
            target_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(target_dir.parent)  # the new folder's name must be durable too
        with self._lock:
            self._counter += 1
            n = self._counter
        tmp = self.tmp_path(f"{threading.get_ident()}-{n}.part")
        target = self.instance_path(series_uid, sop_uid)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self.posix:
                    os.fsync(fd)
                os.replace(tmp, target)
                if not self.posix:
                    os.fsync(fd)  # one journal commit: the data and the rename
            finally:
                os.close(fd)
            if self.posix:
                _fsync_dir(target_dir)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def series_files(self, series_uid: str) -> list[Path]:
        d = self.series_dir(series_uid)
        return sorted(d.glob("*.dcm")) if d.is_dir() else []

    def remove_series(self, series_uid: str) -> None:
        shutil.rmtree(self.series_dir(series_uid), ignore_errors=True)

    def remove_outputs(self, job_id: int) -> None:
        shutil.rmtree(self.out_dir(job_id), ignore_errors=True)

    def remove_pictures(self, job_id: int) -> None:
        shutil.rmtree(self.pictures_dir(job_id), ignore_errors=True)

    # -- quarantine: kept for a person to look at, within a size cap and an age limit ----------
    def quarantine_instance(self, data: bytes, series_uid: str, sop_uid: str, reason: dict[str, Any]) -> Path:
        """Keep an instance refused on arrival as ``quarantine/refused/<series>/<sop>-<hash>.dcm`` with a
        ``.json`` beside it. Every distinct refused copy is kept while the quarantine is under its cap (the
        oldest refused copies make room: a flood of junk must not eat the disk); the space floor applies."""
        self.check_space()
        digest = hashlib.sha256(data).hexdigest()[:16]
        folder = self.refused_dir / (safe_name(series_uid) if series_uid else "unreadable")
        stem = f"{safe_name(sop_uid)}-{digest}" if sop_uid else digest
        info = {"reason": "", **reason, "series_uid": series_uid, "sop_instance_uid": sop_uid, "bytes": len(data),
                "at": _now_iso()}
        note = json.dumps(info, indent=2).encode()
        added = _footprint(len(data)) + _footprint(len(note))
        with self._lock:
            if (folder / f"{stem}.dcm").is_file():  # the same bytes refused again: one copy is enough
                added = 0
            elif self.quarantine_cap and self._refused_bytes + added > self.quarantine_cap:
                self._make_room(added)
            self._refused_bytes += added
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / "tmp", folder / f"{stem}.dcm", data)
        _write_atomic(self.root / "tmp", folder / f"{stem}.json", note)
        return folder / f"{stem}.dcm"

    def _make_room(self, needed: int) -> None:
        """Delete the oldest refused copies until ``needed`` fits under 90 % of the cap (lock held)."""
        files = sorted((f for f in self.refused_dir.rglob("*") if f.is_file()), key=_mtime)
        goal = self.quarantine_cap * 9 // 10 - needed
        for f in files:
            if self._refused_bytes <= goal:
                break
            try:
                size = f.stat().st_size
                f.unlink()
                self._refused_bytes -= _footprint(size)
            except OSError:
                continue

    def purge_quarantine(self, older_than: float) -> int:
        """Remove refused copies and failed jobs' evidence last changed before ``older_than`` (epoch
        seconds); returns how many files and folders went."""
        removed = 0
        with self._lock:
            for f in list(self.refused_dir.rglob("*")) if self.refused_dir.is_dir() else []:
                if f.is_file() and _mtime(f) < older_than:
                    size = f.stat().st_size
                    f.unlink(missing_ok=True)
                    self._refused_bytes -= _footprint(size)
                    removed += 1
            for folder in (self.root / "quarantine").glob("job-*"):
                reason = folder / "REASON.json"
                if _mtime(reason if reason.is_file() else folder) < older_than:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
            for folder in self.refused_dir.glob("*") if self.refused_dir.is_dir() else []:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        return removed

    def quarantine_job(self, job_id: int, series_uid: str, reason: str) -> Path:
        """``quarantine/job-<id>/``: the failed job's input as it was (hard links: no extra space, and a
        later re-send does not change them) and REASON.json."""
        folder = self.root / "quarantine" / f"job-{job_id}"
        shutil.rmtree(folder, ignore_errors=True)  # a job that failed again after a restart
        folder.mkdir(parents=True)
        files = self.series_files(series_uid)
        for f in files:
            try:
                os.link(f, folder / f.name)
            except OSError:  # a file system without hard links
                shutil.copy2(f, folder / f.name)
        info = {"job_id": job_id, "series_uid": series_uid, "reason": reason, "instances": len(files),
                "at": _now_iso()}
        _write_atomic(self.root / "tmp", folder / "REASON.json", json.dumps(info, indent=2).encode())
        return folder


HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]  # in tmp/ names: whose partial write it is
STALE_SECONDS = 6 * 3600  # another host's partial write this old belongs to a process long gone


def tmp_name(name: str) -> str:
    """``<host>-<pid>-<name>``: whose partial write a file in ``tmp/`` is."""
    return f"{HOST}-{os.getpid()}-{name}"


def _stale(leftover: Path) -> bool:
    """A leftover in a shared spool's tmp/ that no live process will finish."""
    parts = leftover.name.split("-")
    if len(parts) >= 2 and parts[0] == HOST and parts[1].isdigit():
        return not _alive(int(parts[1]))
    try:
        return time.time() - leftover.stat().st_mtime > STALE_SECONDS
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _footprint(size: int) -> int:
    """What a file takes on disk, counted in 4 KiB blocks: ten thousand tiny files are not free."""
    return max(4096, (size + 4095) // 4096 * 4096)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _write_atomic(tmp_dir: Path, target: Path, data: bytes) -> None:
    """Whole or absent, never half-written (no fsync: the quarantine is evidence, not a promise to a sender)."""
    tmp = tmp_dir / tmp_name(f"{threading.get_ident()}-{target.name}.part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
