"""The durable job queue: one SQLite database (WAL) beside the spool, or one PostgreSQL shared by many hosts.

States: received → queued → processing → sending → done | failed, each transition
timestamped with a readable reason. Every claim is a single transaction, so a job is
never processed or sent by two workers; after a crash ``recover`` puts interrupted
work back in line (processing restarts from the spooled files, sending resumes with
the destinations that do not have the outputs yet).

One state machine, two databases: :class:`JobStore` holds every transition as SQL that
SQLite and PostgreSQL both run; a :class:`Dialect` says the few things that differ (how
a transaction begins, the placeholders, the schema's types, and that PostgreSQL claims
with ``FOR UPDATE SKIP LOCKED`` so that workers on other hosts pass over a row another
is claiming instead of waiting for it). The embedded default is SQLite in the spool
(``jobs.sqlite``); ``[jobs] store = "postgresql://..."`` selects PostgreSQL
(``jobs_pg.py``, imported only then).

Every claim starts a lease: ``lease_epoch`` counts the claims of a job and is the fence a
worker's later transitions carry (``epoch=``). A worker presumed dead, whose job was
requeued and claimed again, holds an old epoch: its late completion changes nothing
instead of overwriting its successor's. ``lease_until`` is renewed while the work goes on
(:meth:`JobStore.renew`); :meth:`JobStore.reap_expired` puts back in line the work whose
lease ran out.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol


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
    id {id_column},
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0,
    received_at {real},
    last_instance_at {real},
    queued_at {real},
    processing_at {real},
    sending_at {real},
    finished_at {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at {real},
    claimed INTEGER NOT NULL DEFAULT 0,
    derived_series_uid TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    deliveries TEXT NOT NULL DEFAULT '{{}}',
    purged INTEGER NOT NULL DEFAULT 0,
    fingerprint TEXT NOT NULL DEFAULT '',
    process_starts INTEGER NOT NULL DEFAULT 0,
    incomplete_since {real},
    lesions TEXT NOT NULL DEFAULT '[]',
    lease_until {real},
    lease_epoch INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid, state);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sends (
    job_id BIGINT NOT NULL,
    destination TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    sop_uid TEXT NOT NULL,
    status INTEGER NOT NULL,
    at {real} NOT NULL,
    PRIMARY KEY (job_id, destination, epoch, sop_uid)
);
"""
# Columns added after the first release: a spool from an older node gets them on start.
_ADDED_COLUMNS = {"process_starts": "INTEGER NOT NULL DEFAULT 0", "incomplete_since": "REAL",
                  "lesions": "TEXT NOT NULL DEFAULT '[]'", "lease_until": "REAL",
                  "lease_epoch": "INTEGER NOT NULL DEFAULT 0", "owner": "TEXT NOT NULL DEFAULT ''",
                  "timings": "TEXT NOT NULL DEFAULT '{}'"}
DEFAULT_LEASE_SECONDS = 120.0  # a claim's lease; the worker renews it well before it runs out
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
    lease_until: float | None = None  # the claim's lease runs out then, unless renewed
    lease_epoch: int = 0  # claims so far: the fence a worker's transitions carry
    owner: str = ""  # the worker that made the last claim (host:pid)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per processing stage, of the last run

    @classmethod
    def from_row(cls, row: Any) -> Job:
        d = dict(row)
        d["outputs"] = json.loads(d["outputs"] or "[]")
        d["deliveries"] = json.loads(d["deliveries"] or "{}")
        d["lesions"] = json.loads(d.get("lesions") or "[]")
        d["timings"] = json.loads(d.get("timings") or "{}")
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
            "lesions": self.lesions, "claimed": bool(self.claimed), "claims": self.lease_epoch,
            "worker": self.owner, "timings": self.timings,
        }


class Dialect(Protocol):
    """What differs between the databases a :class:`JobStore` runs on."""

    skip_locked: str  # appended to a claim's inner SELECT ("" where one writer at a time is all there is)

    def lock_series(self, series_uid: str) -> None: ...  # serialise writers of one series' job, to commit
    def notify(self) -> None: ...  # work may be waiting: wake other processes' workers (at commit)
    def hold(self, job_id: int) -> None: ...  # this process holds the job: others can tell if it dies
    def release(self, job_id: int) -> None: ...
    def orphans(self, job_ids: list[int]) -> list[int]: ...  # of these claimed jobs, those whose holder is gone
    def listen(self, wake: Any, stop: threading.Event) -> threading.Thread | None: ...  # notifications → wake

    def execute(self, sql: str, args: tuple = ()) -> Any: ...  # a cursor: fetchone(), fetchall(), rowcount
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def in_transaction(self) -> bool: ...
    def close(self) -> None: ...


class SqliteDialect:
    """SQLite in WAL mode: one file beside the spool, one writer at a time (BEGIN IMMEDIATE)."""

    skip_locked = ""

    def lock_series(self, series_uid: str) -> None:
        pass  # BEGIN IMMEDIATE already makes every writer wait its turn

    def notify(self) -> None:
        pass  # one process: its own threads are woken directly (threading.Event)

    def hold(self, job_id: int) -> None:
        pass  # one process owns the whole store: recover() at its next start puts its claims back

    def release(self, job_id: int) -> None:
        pass

    def orphans(self, job_ids: list[int]) -> list[int]:
        return []

    def listen(self, wake: Any, stop: threading.Event) -> threading.Thread | None:
        return None  # no other process to hear from

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a crash can lose the last commits, never corrupt the file; the
        # spooled instances themselves are fsynced, and recover() rebuilds what is missing.
        self.db.execute("PRAGMA synchronous=NORMAL")
        # Tables first, then the columns an older spool lacks, then indexes (none of which name them).
        self.db.executescript(_SCHEMA.format(id_column="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"))
        have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def execute(self, sql: str, args: tuple = ()) -> Any:
        return self.db.execute(sql, args)

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")  # fails too when the disk is full: never leave the transaction open

    def rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def close(self) -> None:
        self.db.close()


_PLACEHOLDER = re.compile(r"\?")


def pyformat(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (the statements here hold no literal ``?`` or ``%``)."""
    return _PLACEHOLDER.sub("%s", sql)


class JobStore:
    """All job state transitions; one connection guarded by a lock (per process: the node's threads share it).

    ``JobStore(path)`` is the embedded SQLite store; :func:`open_job_store` picks the database a
    config names.
    """

    def __init__(self, path: str | Path | None = None, dialect: Dialect | None = None) -> None:
        if dialect is None:
            if path is None:
                raise ValueError("a job store needs a SQLite path or a dialect")
            dialect = SqliteDialect(path)
        self.db = dialect
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _tx(self, fn: Any) -> Any:
        with self._lock:
            self.db.begin()
            try:
                out = fn(self.db)
                self.db.commit()
            except BaseException:
                if self.db.in_transaction():
                    self.db.rollback()
                raise
            return out

    def _read(self, sql: str, args: tuple = ()) -> list[Any]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    @staticmethod
    def _fence(epoch: int | None) -> tuple[str, tuple]:
        """The clause (and argument) that makes a transition count only for the current claim."""
        return ("", ()) if epoch is None else (" AND lease_epoch=?", (int(epoch),))

    # -- receiving ---------------------------------------------------------------------
    def note_instance(self, series_uid: str, study_uid: str, description: str, now: float | None = None,
                      sop_uid: str = "") -> tuple[int, bool]:
        """Count an instance into the series' job that has not started; a new job if there is none."""
        now = time.time() if now is None else now

        def fn(db: Dialect) -> tuple[int, bool]:
            db.lock_series(series_uid)  # two receivers must not both open a job for one series
            if sop_uid:
                db.execute("INSERT INTO instances(sop_uid, series_uid) VALUES (?,?) ON CONFLICT DO NOTHING",
                           (sop_uid, series_uid))
            # A queued job has not started: it takes the instance and waits for quiet again (an aborted
            # series that gets more instances is being re-sent: it waits for quiet like any other).
            row = db.execute("SELECT id FROM jobs WHERE series_uid=? AND state IN ('received','queued') "
                             "ORDER BY id DESC LIMIT 1", (series_uid,)).fetchone()
            if row:
                db.execute("UPDATE jobs SET instances=instances+1, last_instance_at=?, state='received', "
                           "queued_at=NULL, incomplete_since=NULL, reason='collecting instances' WHERE id=?",
                           (now, row["id"]))
                return int(row["id"]), False
            new = db.execute(
                "INSERT INTO jobs(series_uid, study_uid, description, state, reason, instances, received_at, "
                "last_instance_at) VALUES (?,?,?,?,?,?,?,?) RETURNING id",
                (series_uid, study_uid, description, "received", "collecting instances", 1, now, now)).fetchone()
            return int(new["id"]), True
        return self._tx(fn)

    def queue_quiet(self, quiet_seconds: float, now: float | None = None) -> list[Job]:
        """Series that have been quiet long enough become queued jobs."""
        now = time.time() if now is None else now

        def fn(db: Dialect) -> list[Job]:
            rows = db.execute("UPDATE jobs SET state='queued', queued_at=?, reason=? WHERE state='received' "
                              "AND incomplete_since IS NULL AND last_instance_at<=? RETURNING *",
                              (now, f"series quiet for {quiet_seconds:g} s", now - quiet_seconds)).fetchall()
            if rows:
                db.notify()
            return [Job.from_row(r) for r in rows]
        return self._tx(fn)

    def queue_released(self, job_ids: list[int], released_at: float, why: str, now: float | None = None) -> list[Job]:
        """Series whose association was released (or whose STOW-RS request ended) at ``released_at`` become
        queued jobs, unless an instance arrived after it (another association, or another host, is still
        sending: the quiet timer decides then) or the series waits for a re-send."""
        now = time.time() if now is None else now
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))

        def fn(db: Dialect) -> list[Job]:
            rows = db.execute(f"UPDATE jobs SET state='queued', queued_at=?, reason=? WHERE id IN ({marks}) "
                              "AND state='received' AND incomplete_since IS NULL AND last_instance_at<=? RETURNING *",
                              (now, why, *job_ids, released_at)).fetchall()
            if rows:
                db.notify()
            return [Job.from_row(r) for r in rows]
        return self._tx(fn)

    # -- working -----------------------------------------------------------------------
    def claim(self, now: float | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS,
              owner: str = "") -> Job | None:
        """The next piece of work, atomically: a due send first (results out sooner), else a queued job.

        The claim starts a lease of ``lease_seconds`` and a new epoch (the returned job's
        ``lease_epoch``), which the worker's transitions then carry as their fence.
        """
        now = time.time() if now is None else now
        lease = now + lease_seconds

        def fn(db: Dialect) -> Job | None:
            row = db.execute("UPDATE jobs SET claimed=1, lease_until=?, lease_epoch=lease_epoch+1, owner=? WHERE id=("
                             "SELECT id FROM jobs WHERE state='sending' AND claimed=0 AND (next_attempt_at IS NULL "
                             f"OR next_attempt_at<=?) ORDER BY id LIMIT 1{db.skip_locked}) RETURNING *",
                             (lease, owner, now)).fetchone()
            if row is None:
                row = db.execute("UPDATE jobs SET state='processing', processing_at=?, claimed=1, reason='processing', "
                                 "process_starts=process_starts+1, lease_until=?, lease_epoch=lease_epoch+1, owner=? "
                                 "WHERE id=(SELECT id FROM jobs WHERE state='queued' AND (next_attempt_at IS NULL OR "
                                 f"next_attempt_at<=?) ORDER BY id LIMIT 1{db.skip_locked}) RETURNING *",
                                 (now, lease, owner, now)).fetchone()
            if row is None:
                return None
            db.hold(int(row["id"]))  # before the commit: no one sees the claim without its holder's mark
            return Job.from_row(row)
        return self._tx(fn)

    def renew(self, job_id: int, epoch: int, lease_seconds: float = DEFAULT_LEASE_SECONDS,
              now: float | None = None) -> bool:
        """The worker's heartbeat: its lease runs on. False when the claim is no longer its own."""
        now = time.time() if now is None else now
        cur = self._tx(lambda db: db.execute("UPDATE jobs SET lease_until=? WHERE id=? AND claimed=1 AND "
                                             "lease_epoch=?", (now + lease_seconds, job_id, int(epoch))))
        return cur.rowcount > 0

    def reap_expired(self, now: float | None = None) -> list[Job]:
        """Claims whose lease ran out (their worker died or lost the database): processing goes back to
        the queue (the run stays counted, as a crash does), a send is unclaimed for another worker."""
        now = time.time() if now is None else now
        return self._put_back("lease_until IS NOT NULL AND lease_until<?", (now,),
                              "requeued: its worker stopped renewing its lease",
                              "resuming delivery: its worker stopped renewing its lease")

    def _put_back(self, condition: str, args: tuple, processing_reason: str, sending_reason: str) -> list[Job]:
        """Claimed jobs matching ``condition`` back in line: processing requeued (the run stays counted, as
        a crash does), a send unclaimed for another worker; workers elsewhere are woken."""
        def fn(db: Dialect) -> list[Job]:
            rows = db.execute("UPDATE jobs SET state='queued', claimed=0, next_attempt_at=NULL, lease_until=NULL, "
                              f"reason=? WHERE state='processing' AND claimed=1 AND {condition} RETURNING *",
                              (processing_reason, *args)).fetchall()
            rows += db.execute("UPDATE jobs SET claimed=0, next_attempt_at=NULL, lease_until=NULL, reason=? "
                               f"WHERE state='sending' AND claimed=1 AND {condition} RETURNING *",
                               (sending_reason, *args)).fetchall()
            if rows:
                db.notify()
            return [Job.from_row(r) for r in rows]
        return self._tx(fn)

    def to_sending(self, job_id: int, outputs: list[str], derived_series_uid: str, reason: str,
                   epoch: int | None = None) -> bool:
        return self._update(job_id, epoch, _notify=True, _release=True, state="sending", sending_at=time.time(),
                            claimed=0, next_attempt_at=None, outputs=json.dumps(outputs),
                            derived_series_uid=derived_series_uid, reason=reason, lease_until=None)

    def finish(self, job_id: int, state: JobState | str, reason: str, epoch: int | None = None, **more: Any) -> bool:
        if JobState(state) not in (JobState.DONE, JobState.FAILED):
            raise ValueError(f"a job finishes done or failed, not {state!r}")
        return self._update(job_id, epoch, _release=True, state=str(JobState(state)), finished_at=time.time(),
                            claimed=0, reason=reason, lease_until=None, **more)

    def hand_back(self, job_id: int, state: str, next_attempt_at: float, reason: str, epoch: int | None = None) -> bool:
        """A claimed job goes back in line unfinished (processing: queued again; sending: unclaimed), to be
        claimed after ``next_attempt_at``; no attempt is counted: the trouble was the node's, not the job's."""
        if JobState(state) not in (JobState.QUEUED, JobState.SENDING):
            raise ValueError(f"a job is handed back queued or sending, not {state!r}")
        fence, fargs = self._fence(epoch)
        # Only while still claimed and unfinished: a job that got to done or failed stays there. A processing
        # run handed back did not crash: it does not count against jobs.max_crashes.
        cur = self._tx(lambda db: db.execute(
            "UPDATE jobs SET state=?, claimed=0, next_attempt_at=?, reason=?, lease_until=NULL, "
            "process_starts=CASE WHEN state='processing' AND process_starts>0 THEN process_starts-1 "
            "ELSE process_starts END WHERE id=? AND claimed=1 AND state IN ('processing','sending')" + fence,
            (str(JobState(state)), next_attempt_at, reason, job_id, *fargs)))
        self._let_go(job_id)
        return cur.rowcount > 0

    def crashed(self, job_id: int, next_attempt_at: float, reason: str, epoch: int | None = None) -> bool:
        """A processing run died (crash, memory or time limit): queued again, the run stays counted."""
        fence, fargs = self._fence(epoch)
        cur = self._tx(lambda db: db.execute("UPDATE jobs SET state='queued', claimed=0, next_attempt_at=?, reason=?, "
                                             "lease_until=NULL WHERE id=? AND state='processing'" + fence,
                                             (next_attempt_at, reason, job_id, *fargs)))
        self._let_go(job_id)
        return cur.rowcount > 0

    def series_of_instance(self, sop_uid: str) -> str | None:
        """The series an instance (by SOP Instance UID) was counted into, if any."""
        rows = self._read("SELECT series_uid FROM instances WHERE sop_uid=?", (sop_uid,))
        return str(rows[0]["series_uid"]) if rows else None

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
        return [int(r["id"]) for r in rows]

    def expire_incomplete(self, older_than: float, now: float | None = None) -> list[Job]:
        """Aborted series never re-sent: failed with the reason (their instances stay in the spool)."""
        now = time.time() if now is None else now
        rows = self._tx(lambda db: db.execute(
            "UPDATE jobs SET state='failed', finished_at=?, claimed=0, reason='incomplete: the association that "
            "brought this series was aborted after ' || CAST(instances AS TEXT) || ' instances and the rest never "
            "came' WHERE state='received' AND incomplete_since IS NOT NULL AND incomplete_since<=? RETURNING *",
            (now, older_than)).fetchall())
        return [Job.from_row(r) for r in rows]

    def retry_later(self, job_id: int, attempts: int, next_attempt_at: float, reason: str,
                    epoch: int | None = None) -> bool:
        return self._update(job_id, epoch, _release=True, attempts=attempts, next_attempt_at=next_attempt_at,
                            claimed=0, reason=reason, lease_until=None)

    def set_deliveries(self, job_id: int, deliveries: dict[str, dict[str, Any]]) -> None:
        self._update(job_id, None, deliveries=json.dumps(deliveries))

    def set_fingerprint(self, job_id: int, fingerprint: str) -> None:
        self._update(job_id, None, fingerprint=fingerprint)

    def set_lesions(self, job_id: int, lesions: list[dict[str, Any]]) -> None:
        """The job's lesion table: each lesion, where and how big, its region's restoration and confidence,
        and its picture (process.lesion_table)."""
        self._update(job_id, None, lesions=json.dumps(lesions))

    def set_timings(self, job_id: int, timings: dict[str, float]) -> None:
        """Where the last processing run spent its time, stage by stage (GET /jobs/{id}, the benchmarks)."""
        self._update(job_id, None, timings=json.dumps(timings))

    def delivered_twin(self, job_id: int, series_uid: str, fingerprint: str) -> Job | None:
        """An earlier job that processed exactly these instances with this model and finished."""
        rows = self._read("SELECT * FROM jobs WHERE series_uid=? AND fingerprint=? AND id<>? AND state='done' "
                          "ORDER BY id DESC LIMIT 1", (series_uid, fingerprint, job_id))
        return Job.from_row(rows[0]) if rows else None

    def mark_purged(self, job_id: int) -> None:
        self._update(job_id, None, purged=1)

    def _update(self, job_id: int, epoch: int | None = None, _notify: bool = False, _release: bool = False,
                **values: Any) -> bool:
        cols = ", ".join(f"{k}=?" for k in values)
        fence, fargs = self._fence(epoch)

        def fn(db: Dialect) -> Any:
            cur = db.execute(f"UPDATE jobs SET {cols} WHERE id=?{fence}", (*values.values(), job_id, *fargs))
            if _notify and cur.rowcount > 0:
                db.notify()
            return cur
        changed = self._tx(fn).rowcount > 0
        if _release:
            self._let_go(job_id)
        return changed

    def _let_go(self, job_id: int) -> None:
        """This process no longer holds the job (whether or not its transition counted)."""
        try:
            with self._lock:
                self.db.release(job_id)
        except Exception:  # noqa: BLE001 - a lost connection released it already
            pass

    def reap_orphans(self) -> list[Job]:
        """Claims whose holder's connection is gone (the process or its host died): back in line at once,
        as :meth:`reap_expired` would do when their lease runs out. PostgreSQL only: a session lock per
        claimed job, which the database drops with the session."""
        claimed = [r["id"] for r in self._read("SELECT id FROM jobs WHERE claimed=1 AND state IN "
                                                "('processing','sending')")]
        with self._lock:
            gone = self.db.orphans([int(i) for i in claimed])
        if not gone:
            return []
        return self._put_back(f"id IN ({','.join('?' * len(gone))})", tuple(gone),
                              "requeued: the worker holding it is gone",
                              "resuming delivery: the worker sending it is gone")

    def listen(self, wake: Any, stop: threading.Event) -> threading.Thread | None:
        """Where the database can tell other processes that work is waiting, a thread that calls ``wake``
        when it does (PostgreSQL: LISTEN); None where this process is the only one (SQLite)."""
        return self.db.listen(wake, stop)

    def recover(self, now: float | None = None) -> list[Job]:
        """After a restart: interrupted processing goes back to the queue, interrupted sends are unclaimed.

        A series that was still arriving gets a fresh quiet period: the time the node was down is no
        silence of the sender's (its association broke; it retries what got no answer), and starting
        the timer anew keeps a half-received series from being processed before the retry comes.
        (With a store shared by several hosts, one host's restart must not take the others' work:
        there, leases and :meth:`reap_expired` do this job.)
        """
        now = time.time() if now is None else now

        def fn(db: Dialect) -> list[Job]:
            rows = self._restart_quiet(db, now, "restarted")
            rows += db.execute("UPDATE jobs SET state='queued', claimed=0, next_attempt_at=NULL, lease_until=NULL, "
                               "reason='requeued after restart' WHERE state='processing' RETURNING *").fetchall()
            rows += db.execute("UPDATE jobs SET claimed=0, next_attempt_at=NULL, lease_until=NULL, reason='resuming "
                               "delivery after restart' WHERE state='sending' AND claimed=1 RETURNING *").fetchall()
            return [Job.from_row(r) for r in rows]
        return self._tx(fn)

    @staticmethod
    def _restart_quiet(db: Dialect, now: float, why: str) -> list[Any]:
        return db.execute("UPDATE jobs SET last_instance_at=?, reason='collecting instances (' || ? || ': waiting "
                          "for the rest of the series)' WHERE state='received' RETURNING *", (now, why)).fetchall()

    def restart_quiet(self, why: str, now: float | None = None) -> list[Job]:
        """Every series still arriving starts its quiet period again: after a time in which the node could
        not take instances (the job store was away), silence is no sign that the sender had finished."""
        now = time.time() if now is None else now
        return [Job.from_row(r) for r in self._tx(lambda db: self._restart_quiet(db, now, why))]

    # -- the send ledger -----------------------------------------------------------------
    def record_sends(self, job_id: int, destination: str, epoch: int, sent: list[tuple[str, int]],
                     now: float | None = None) -> None:
        """Each instance handed to a destination, with its status, under the claim (epoch) that sent it.

        Deterministic UIDs make a re-sent derived series the same objects (the PACS keeps one copy);
        the ledger makes each attempt visible: which instances went out, by which claim, answered how.
        """
        if not sent:
            return
        now = time.time() if now is None else now

        def fn(db: Dialect) -> None:
            for sop_uid, status in sent:
                db.execute("INSERT INTO sends(job_id, destination, epoch, sop_uid, status, at) VALUES (?,?,?,?,?,?) "
                           "ON CONFLICT DO NOTHING", (job_id, destination, int(epoch), sop_uid, int(status), now))
        self._tx(fn)

    def ledger(self, job_id: int) -> dict[str, dict[str, dict[str, int]]]:
        """Per destination, per claim (epoch): instances stored and refused."""
        rows = self._read("SELECT destination, epoch, SUM(CASE WHEN status=0 THEN 1 ELSE 0 END) AS stored, "
                          "SUM(CASE WHEN status<>0 THEN 1 ELSE 0 END) AS refused FROM sends WHERE job_id=? "
                          "GROUP BY destination, epoch ORDER BY destination, epoch", (job_id,))
        out: dict[str, dict[str, dict[str, int]]] = {}
        for r in rows:
            out.setdefault(r["destination"], {})[str(r["epoch"])] = {"stored": int(r["stored"]),
                                                                     "refused": int(r["refused"])}
        return out

    # -- reading -----------------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        if not 0 < job_id <= MAX_JOB_ID:
            return None
        rows = self._read("SELECT * FROM jobs WHERE id=?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def list(self, state: str | None = None, limit: int = 100, series_uid: str | None = None) -> list[Job]:
        where, args = [], []
        if state:
            where.append("state=?")
            args.append(state)
        if series_uid:
            where.append("series_uid=?")
            args.append(series_uid)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        return [Job.from_row(r) for r in self._read(sql, (*args, limit))]

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        out = dict.fromkeys(STATES, 0)
        out.update({r["state"]: int(r["n"]) for r in rows})
        return out

    def unfinished_series(self) -> set[str]:
        rows = self._read("SELECT DISTINCT series_uid FROM jobs WHERE state NOT IN ('done','failed')")
        return {r["series_uid"] for r in rows}

    def finished_unpurged(self, before: float) -> list[Job]:
        rows = self._read("SELECT * FROM jobs WHERE state='done' AND purged=0 AND finished_at<=?", (before,))
        return [Job.from_row(r) for r in rows]


def open_job_store(url: str, sqlite_path: str | Path) -> JobStore:
    """The store ``[jobs] store`` names: "" (the embedded default) is SQLite at ``sqlite_path``;
    ``postgresql://...`` is a PostgreSQL shared by every host (``jobs_pg``, imported only then)."""
    if not url:
        return JobStore(sqlite_path)
    if url.startswith(("postgresql://", "postgres://")):
        from dicom_node.node.jobs_pg import PostgresDialect

        return JobStore(dialect=PostgresDialect(url))
    raise ValueError(f"jobs.store must be empty (SQLite in the spool) or a postgresql:// URL, not {url[:20]!r}")
