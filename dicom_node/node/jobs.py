"""The durable job queue: one SQLite database (WAL) beside the spool.

States: received → queued → processing → sending → done | failed, each transition
timestamped with a readable reason. Every claim is a single transaction, so a job is
never processed or sent by two workers; after a crash ``recover`` puts interrupted
work back in line (processing restarts from the spooled files, sending resumes with
the destinations that do not have the outputs yet).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class JobState(StrEnum):
    """A job's state; equal to its name as a string, which is what the database and /jobs hold."""

    RECEIVED = "received"
    QUEUED = "queued"
    PROCESSING = "processing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


STATES = tuple(s.value for s in JobState)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0,
    received_at REAL,
    last_instance_at REAL,
    queued_at REAL,
    processing_at REAL,
    sending_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    claimed INTEGER NOT NULL DEFAULT 0,
    derived_series_uid TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    deliveries TEXT NOT NULL DEFAULT '{}',
    purged INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT NOT NULL DEFAULT '',
    process_starts INTEGER NOT NULL DEFAULT 0,
    incomplete_since REAL,
    lesions TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid, state);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL
);
"""
# Columns added after the first release: a spool from an older node gets them on start.
_ADDED_COLUMNS = {"process_starts": "INTEGER NOT NULL DEFAULT 0", "incomplete_since": "REAL",
                  "lesions": "TEXT NOT NULL DEFAULT '[]'"}
MAX_JOB_ID = (1 << 63) - 1  # SQLite's INTEGER; a larger id is no job of ours (and must not overflow the lookup)


@dataclass
class Job:
    id: int
    series_uid: str
    study_uid: str
    description: str
    state: str
    reason: str
    instances: int
    received_at: float | None
    last_instance_at: float | None
    queued_at: float | None
    processing_at: float | None
    sending_at: float | None
    finished_at: float | None
    attempts: int
    next_attempt_at: float | None
    claimed: int
    derived_series_uid: str
    outputs: list[str] = field(default_factory=list)
    deliveries: dict[str, dict[str, Any]] = field(default_factory=dict)
    purged: int = 0
    fingerprint: str = ""
    process_starts: int = 0  # processing runs begun; one that never ended counts against jobs.max_crashes
    incomplete_since: float | None = None  # its association was aborted: not queued until re-sent or expired
    lesions: list[dict[str, Any]] = field(default_factory=list)  # per lesion: position, size, restoration, picture

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["outputs"] = json.loads(d["outputs"] or "[]")
        d["deliveries"] = json.loads(d["deliveries"] or "{}")
        d["lesions"] = json.loads(d.get("lesions") or "[]")
        return cls(**d)

    def deliveries_cover(self, names: list[str]) -> bool:
        """True when every named destination has this job's outputs."""
        return all(self.deliveries.get(n, {}).get("state") == "done" for n in names)

    def as_json(self) -> dict[str, Any]:
        """What /jobs shows: ISO timestamps, no internal bookkeeping."""
        def iso(t: float | None) -> str | None:
            if t is None:
                return None
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        return {
            "id": self.id, "state": self.state, "reason": self.reason, "series_uid": self.series_uid,
            "study_uid": self.study_uid, "description": self.description, "instances": self.instances,
            "received_at": iso(self.received_at), "last_instance_at": iso(self.last_instance_at),
            "queued_at": iso(self.queued_at), "processing_at": iso(self.processing_at),
            "sending_at": iso(self.sending_at), "finished_at": iso(self.finished_at),
            "attempts": self.attempts, "next_attempt_at": iso(self.next_attempt_at),
            "derived_series_uid": self.derived_series_uid, "outputs": len(self.outputs),
            "deliveries": self.deliveries, "files_purged": bool(self.purged),
            "processing_runs": self.process_starts, "incomplete_since": iso(self.incomplete_since),
            "lesions": self.lesions,
        }


class JobStore:
    """All job state transitions; one connection guarded by a lock (the node is one process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a crash can lose the last commits, never corrupt the file; the
        # spooled instances themselves are fsynced, and recover() rebuilds what is missing.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Tables first, then the columns an older spool lacks, then indexes (none of which name them).
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn: Any) -> Any:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
                self._db.execute("COMMIT")  # fails too when the disk is full: never leave the transaction open
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return out

    # -- receiving ---------------------------------------------------------------------
    def note_instance(self, series_uid: str, study_uid: str, description: str, now: float | None = None,
                      sop_uid: str = "") -> tuple[int, bool]:
        """Count an instance into the series' job that has not started; a new job if there is none."""
        now = time.time() if now is None else now

        def fn(db: sqlite3.Connection) -> tuple[int, bool]:
            if sop_uid:
                db.execute("INSERT OR IGNORE INTO instances(sop_uid, series_uid) VALUES (?,?)", (sop_uid, series_uid))
            # A queued job has not started: it takes the instance and waits for quiet again (an aborted
            # series that gets more instances is being re-sent: it waits for quiet like any other).
            row = db.execute("SELECT id FROM jobs WHERE series_uid=? AND state IN ('received','queued') "
                             "ORDER BY id DESC LIMIT 1", (series_uid,)).fetchone()
            if row:
                db.execute("UPDATE jobs SET instances=instances+1, last_instance_at=?, state='received', "
                           "queued_at=NULL, incomplete_since=NULL, reason='collecting instances' WHERE id=?",
                           (now, row[0]))
                return int(row[0]), False
            cur = db.execute(
                "INSERT INTO jobs(series_uid, study_uid, description, state, reason, instances, received_at, "
                "last_instance_at) VALUES (?,?,?,?,?,?,?,?)",
                (series_uid, study_uid, description, "received", "collecting instances", 1, now, now))
            return int(cur.lastrowid), True
        return self._tx(fn)

    def queue_quiet(self, quiet_seconds: float, now: float | None = None) -> list[Job]:
        """Series that have been quiet long enough become queued jobs."""
        now = time.time() if now is None else now

        def fn(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute("UPDATE jobs SET state='queued', queued_at=?, reason=? WHERE state='received' "
                              "AND incomplete_since IS NULL AND last_instance_at<=? RETURNING *",
                              (now, f"series quiet for {quiet_seconds:g} s", now - quiet_seconds)).fetchall()
            return [Job.from_row(r) for r in rows]
        return self._tx(fn)

    # -- working -----------------------------------------------------------------------
    def claim(self, now: float | None = None) -> Job | None:
        """The next piece of work, atomically: a due send first (results out sooner), else a queued job."""
        now = time.time() if now is None else now

        def fn(db: sqlite3.Connection) -> Job | None:
            row = db.execute("UPDATE jobs SET claimed=1 WHERE id=(SELECT id FROM jobs WHERE state='sending' "
                             "AND claimed=0 AND (next_attempt_at IS NULL OR next_attempt_at<=?) ORDER BY id LIMIT 1) "
                             "RETURNING *", (now,)).fetchone()
            if row is None:
                row = db.execute("UPDATE jobs SET state='processing', processing_at=?, claimed=1, reason='processing', "
                                 "process_starts=process_starts+1 WHERE id=(SELECT id FROM jobs WHERE state='queued' "
                                 "AND (next_attempt_at IS NULL OR next_attempt_at<=?) ORDER BY id LIMIT 1) RETURNING *",
                                 (now, now)).fetchone()
            return Job.from_row(row) if row else None
        return self._tx(fn)

    def to_sending(self, job_id: int, outputs: list[str], derived_series_uid: str, reason: str) -> None:
        self._update(job_id, state="sending", sending_at=time.time(), claimed=0, next_attempt_at=None,
                     outputs=json.dumps(outputs), derived_series_uid=derived_series_uid, reason=reason)

    def finish(self, job_id: int, state: JobState | str, reason: str, **more: Any) -> None:
        if JobState(state) not in (JobState.DONE, JobState.FAILED):
            raise ValueError(f"a job finishes done or failed, not {state!r}")
        self._update(job_id, state=state, finished_at=time.time(), claimed=0, reason=reason, **more)

    def hand_back(self, job_id: int, state: str, next_attempt_at: float, reason: str) -> None:
        """A claimed job goes back in line unfinished (processing: queued again; sending: unclaimed), to be
        claimed after ``next_attempt_at``; no attempt is counted: the trouble was the node's, not the job's."""
        if JobState(state) not in (JobState.QUEUED, JobState.SENDING):
            raise ValueError(f"a job is handed back queued or sending, not {state!r}")
        # Only while still claimed and unfinished: a job that got to done or failed stays there. A processing
        # run handed back did not crash: it does not count against jobs.max_crashes.
        self._tx(lambda db: db.execute("UPDATE jobs SET state=?, claimed=0, next_attempt_at=?, reason=?, "
                                       "process_starts=MAX(0, process_starts - (state='processing')) WHERE id=? "
                                       "AND claimed=1 AND state IN ('processing','sending')",
                                       (state, next_attempt_at, reason, job_id)))

    def crashed(self, job_id: int, next_attempt_at: float, reason: str) -> None:
        """A processing run died (crash, memory or time limit): queued again, the run stays counted."""
        self._tx(lambda db: db.execute("UPDATE jobs SET state='queued', claimed=0, next_attempt_at=?, reason=? "
                                       "WHERE id=? AND state='processing'", (next_attempt_at, reason, job_id)))

    def series_of_instance(self, sop_uid: str) -> str | None:
        """The series an instance (by SOP Instance UID) was counted into, if any."""
        with self._lock:
            row = self._db.execute("SELECT series_uid FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
        return str(row[0]) if row else None

    def mark_incomplete(self, job_ids: list[int], reason: str, now: float | None = None) -> list[int]:
        """Jobs still collecting whose association was aborted: they wait for a re-send, not for quiet."""
        now = time.time() if now is None else now
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        rows = self._tx(lambda db: db.execute(
            f"UPDATE jobs SET state='received', queued_at=NULL, incomplete_since=?, reason=? WHERE id IN ({marks}) "
            "AND state IN ('received','queued') "
            "RETURNING id", (now, reason, *job_ids)).fetchall())
        return [int(r[0]) for r in rows]

    def expire_incomplete(self, older_than: float, now: float | None = None) -> list[Job]:
        """Aborted series never re-sent: failed with the reason (their instances stay in the spool)."""
        now = time.time() if now is None else now
        rows = self._tx(lambda db: db.execute(
            "UPDATE jobs SET state='failed', finished_at=?, claimed=0, reason='incomplete: the association that "
            "brought this series was aborted after ' || instances || ' instances and the rest never came' "
            "WHERE state='received' AND incomplete_since IS NOT NULL AND incomplete_since<=? RETURNING *",
            (now, older_than)).fetchall())
        return [Job.from_row(r) for r in rows]

    def retry_later(self, job_id: int, attempts: int, next_attempt_at: float, reason: str) -> None:
        self._update(job_id, attempts=attempts, next_attempt_at=next_attempt_at, claimed=0, reason=reason)

    def set_deliveries(self, job_id: int, deliveries: dict[str, dict[str, Any]]) -> None:
        self._update(job_id, deliveries=json.dumps(deliveries))

    def set_fingerprint(self, job_id: int, fingerprint: str) -> None:
        self._update(job_id, fingerprint=fingerprint)

    def set_lesions(self, job_id: int, lesions: list[dict[str, Any]]) -> None:
        """The job's lesion table: each lesion, where and how big, its region's restoration and confidence,
        and its picture (process.lesion_table)."""
        self._update(job_id, lesions=json.dumps(lesions))

    def delivered_twin(self, job_id: int, series_uid: str, fingerprint: str) -> Job | None:
        """An earlier job that processed exactly these instances with this model and finished."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE series_uid=? AND fingerprint=? AND id<>? AND "
                                   "state='done' ORDER BY id DESC LIMIT 1",
                                   (series_uid, fingerprint, job_id)).fetchone()
        return Job.from_row(row) if row else None

    def mark_purged(self, job_id: int) -> None:
        self._update(job_id, purged=1)

    def _update(self, job_id: int, **values: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in values)
        self._tx(lambda db: db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*values.values(), job_id)))

    def recover(self, now: float | None = None) -> list[Job]:
        """After a restart: interrupted processing goes back to the queue, interrupted sends are unclaimed.

        A series that was still arriving gets a fresh quiet period: the time the node was down is no
        silence of the sender's (its association broke; it retries what got no answer), and starting
        the timer anew keeps a half-received series from being processed before the retry comes.
        """
        now = time.time() if now is None else now

        def fn(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute("UPDATE jobs SET last_instance_at=?, reason='collecting instances (restarted: waiting "
                              "for the rest of the series)' WHERE state='received' RETURNING *", (now,)).fetchall()
            rows += db.execute("UPDATE jobs SET state='queued', claimed=0, next_attempt_at=NULL, reason='requeued "
                               "after restart' WHERE state='processing' RETURNING *").fetchall()
            rows += db.execute("UPDATE jobs SET claimed=0, next_attempt_at=NULL, reason='resuming delivery after "
                               "restart' WHERE state='sending' AND claimed=1 RETURNING *").fetchall()
            return [Job.from_row(r) for r in rows]
        return self._tx(fn)

    # -- reading -----------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        if not 0 < job_id <= MAX_JOB_ID:
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, state: str | None = None, limit: int = 100, series_uid: str | None = None) -> list[Job]:
        where, args = [], []
        if state:
            where.append("state=?")
            args.append(state)
        if series_uid:
            where.append("series_uid=?")
            args.append(series_uid)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: int(r[1]) for r in rows})
        return out

    def unfinished_series(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT series_uid FROM jobs WHERE state NOT IN ('done','failed')")
            return {r[0] for r in rows.fetchall()}

    def finished_unpurged(self, before: float) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state='done' AND purged=0 AND finished_at<=?",
                                    (before,)).fetchall()
        return [Job.from_row(r) for r in rows]
