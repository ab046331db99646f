"""The job store's contract, run against both implementations: SQLite (the embedded default) and PostgreSQL.

One state machine (``jobs.JobStore``) over two dialects: every transition must behave the same on
both, including the lease and the fence a multi-host deployment relies on. The PostgreSQL cases run
on a private cluster the tests start (``peers.PostgresCluster``: initdb and pg_ctl under the
postgres user when run as root), one fresh database per test.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from dicom_node.node.jobs import JobState, JobStore, open_job_store
from tests.node.conftest import postgres_cluster

_databases = itertools.count()


@pytest.fixture(scope="module")
def cluster():
    c = postgres_cluster()
    yield c
    c.remove()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def opener(request, tmp_path: Path):
    """Opens stores on one database (each call a new connection, as another process or host would)."""
    opened: list[JobStore] = []
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite"

        def open_() -> JobStore:
            opened.append(open_job_store("", path))
            return opened[-1]
    else:
        url = request.getfixturevalue("cluster").create_database(f"contract{next(_databases)}")

        def open_() -> JobStore:
            opened.append(open_job_store(url, tmp_path / "unused.sqlite"))
            return opened[-1]
    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(opener) -> JobStore:
    return opener()


def _queued(store: JobStore, series: str, now: float = 1000.0) -> int:
    job_id, _ = store.note_instance(series, "1.2", f"series {series}", now=now, sop_uid=f"{series}.1")
    store.queue_quiet(5.0, now=now + 10)
    return job_id


def test_instances_gather_into_one_job_per_series_until_it_starts(store: JobStore) -> None:
    a, new = store.note_instance("1.1", "1.0", "CTA", now=100.0, sop_uid="1.1.1")
    b, again = store.note_instance("1.1", "1.0", "CTA", now=101.0, sop_uid="1.1.2")
    c, other = store.note_instance("1.9", "1.0", "other", now=101.0, sop_uid="1.9.1")
    assert new and not again and other and a == b != c
    store.note_instance("1.1", "1.0", "CTA", now=102.0, sop_uid="1.1.2")  # the same instance again
    assert store.series_of_instance("1.1.2") == "1.1" and store.series_of_instance("9.9") is None
    job = store.get(a)
    assert job.instances == 3 and job.state == "received" and job.last_instance_at == 102.0
    assert [j.id for j in store.queue_quiet(5.0, now=106.0)] == [c]  # quiet since 101; the other since 102
    assert store.get(c).state == "queued" and store.get(a).state == "received"
    store.note_instance("1.9", "1.0", "other", now=106.5, sop_uid="1.9.2")  # queued, not started: it takes it
    assert store.get(c).state == "received" and store.get(c).instances == 2
    assert store.counts()["received"] == 2 and store.counts()["queued"] == 0


def test_claims_take_due_sends_first_and_start_a_lease_with_a_new_epoch(store: JobStore) -> None:
    first, second = _queued(store, "2.1"), _queued(store, "2.2")
    job = store.claim(now=2000.0, lease_seconds=30.0)
    assert job.id == first and job.state == "processing" and job.process_starts == 1
    assert job.lease_epoch == 1 and job.lease_until == 2030.0
    assert store.to_sending(first, ["/x.dcm"], "2.25.1", "sending", epoch=job.lease_epoch)
    send = store.claim(now=2001.0)
    assert send.id == first and send.state == "sending" and send.lease_epoch == 2  # sends before new work
    assert store.claim(now=2002.0).id == second
    assert store.claim(now=2003.0) is None


def test_a_stale_epoch_changes_nothing(store: JobStore) -> None:
    """A worker presumed dead comes back: its completion must not overwrite its successor's claim."""
    job_id = _queued(store, "3.1")
    old = store.claim(now=3000.0, lease_seconds=10.0)
    assert [j.id for j in store.reap_expired(now=3011.0)] == [job_id]  # its lease ran out
    assert store.get(job_id).state == "queued" and store.get(job_id).process_starts == 1  # the run stays counted
    new = store.claim(now=3012.0, lease_seconds=10.0)
    assert new.lease_epoch == old.lease_epoch + 1
    assert not store.finish(job_id, "done", "late", epoch=old.lease_epoch)
    assert not store.to_sending(job_id, [], "", "late", epoch=old.lease_epoch)
    assert not store.renew(job_id, old.lease_epoch, now=3013.0)
    assert store.get(job_id).state == "processing"
    assert store.renew(job_id, new.lease_epoch, lease_seconds=60.0, now=3013.0)
    assert store.reap_expired(now=3030.0) == []  # renewed: not reaped
    assert store.finish(job_id, JobState.DONE, "delivered", epoch=new.lease_epoch)
    assert store.get(job_id).state == "done" and store.get(job_id).lease_until is None


def test_an_expired_send_is_unclaimed_for_another_worker(store: JobStore) -> None:
    job_id = _queued(store, "4.1")
    job = store.claim(now=4000.0)
    store.to_sending(job_id, ["/a"], "2.25.4", "sending", epoch=job.lease_epoch)
    send = store.claim(now=4001.0, lease_seconds=5.0)
    reaped = store.reap_expired(now=4007.0)
    assert [j.id for j in reaped] == [job_id] and reaped[0].state == "sending" and reaped[0].claimed == 0
    assert store.claim(now=4008.0).lease_epoch == send.lease_epoch + 1


def test_hand_back_and_crash_count_runs_differently(store: JobStore) -> None:
    job_id = _queued(store, "5.1")
    store.claim(now=5000.0)
    assert store.hand_back(job_id, "queued", 5001.0, "node stopping")
    assert store.get(job_id).process_starts == 0  # the node's trouble, not the job's
    assert store.claim(now=5000.5) is None  # not before next_attempt_at
    store.claim(now=5002.0)
    assert store.crashed(job_id, 5003.0, "killed: memory")
    job = store.get(job_id)
    assert job.state == "queued" and job.process_starts == 1 and job.reason == "killed: memory"
    with pytest.raises(ValueError):
        store.finish(job_id, "queued", "no")


def test_an_aborted_series_waits_for_a_resend_then_expires_with_its_count(store: JobStore) -> None:
    job_id, _ = store.note_instance("6.1", "1.0", "CTA", now=6000.0, sop_uid="6.1.1")
    store.note_instance("6.1", "1.0", "CTA", now=6001.0, sop_uid="6.1.2")
    assert store.mark_incomplete([job_id], "association aborted", now=6002.0) == [job_id]
    assert store.queue_quiet(1.0, now=7000.0) == []  # not queued by quiet
    expired = store.expire_incomplete(older_than=6002.0, now=7001.0)
    assert [j.id for j in expired] == [job_id] and expired[0].state == "failed"
    assert "aborted after 2 instances" in expired[0].reason


def test_recover_requeues_interrupted_work(store: JobStore) -> None:
    a, b = _queued(store, "7.1"), _queued(store, "7.2")
    store.claim(now=7000.0)
    job = store.claim(now=7000.0)
    store.to_sending(b, ["/b"], "2.25.7", "sending", epoch=job.lease_epoch)
    store.claim(now=7001.0)
    store.note_instance("7.3", "1.0", "CTA", now=7002.0)
    recovered = {j.id: j for j in store.recover(now=8000.0)}
    assert recovered[a].state == "queued" and recovered[b].state == "sending" and recovered[b].claimed == 0
    assert store.list(state="received")[0].last_instance_at == 8000.0


def test_reading_back(store: JobStore) -> None:
    job_id = _queued(store, "8.1")
    job = store.claim(now=8000.0)
    store.set_fingerprint(job_id, "fp")
    store.set_lesions(job_id, [{"lesion": 1, "volume_mm3": 2.5}])
    store.set_deliveries(job_id, {"pacs": {"state": "done"}})
    store.finish(job_id, "done", "delivered", epoch=job.lease_epoch)
    twin_id = _queued(store, "8.1", now=9000.0)
    assert store.delivered_twin(twin_id, "8.1", "fp").id == job_id
    got = store.get(job_id)
    assert got.lesions == [{"lesion": 1, "volume_mm3": 2.5}] and got.deliveries_cover(["pacs"])
    assert [j.id for j in store.list(limit=10)] == [twin_id, job_id] and store.list(series_uid="none") == []
    assert store.unfinished_series() == {"8.1"} and store.get(10**30) is None and store.get(-1) is None
    assert [j.id for j in store.finished_unpurged(before=time.time() + 1)] == [job_id]
    store.mark_purged(job_id)
    assert store.finished_unpurged(before=time.time() + 1) == []


def test_concurrent_workers_never_claim_the_same_job(opener) -> None:
    """Separate connections, as separate processes or hosts: every job claimed exactly once."""
    setup = opener()
    jobs = {_queued(setup, f"9.{i}") for i in range(24)}
    stores = [opener() for _ in range(4)]
    claimed: list[int] = []
    lock = threading.Lock()

    def work(s: JobStore) -> None:
        while (job := s.claim(now=20000.0)) is not None:
            with lock:
                claimed.append(job.id)
    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(jobs)


def test_receivers_given_one_series_open_one_job(opener) -> None:
    stores = [opener() for _ in range(3)]
    ids: list[int] = []
    lock = threading.Lock()

    def receive(s: JobStore, k: int) -> None:
        for i in range(10):
            job_id, _ = s.note_instance("10.1", "1.0", "CTA", now=30000.0 + i, sop_uid=f"10.1.{k}.{i}")
            with lock:
                ids.append(job_id)
    threads = [threading.Thread(target=receive, args=(s, k)) for k, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(ids)) == 1 and stores[0].get(ids[0]).instances == 30


@pytest.mark.postgres
def test_an_unreachable_store_is_one_readable_line_without_the_password() -> None:
    from dicom_node_lab.peers import free_port

    url = f"postgresql://node:s3cret-pass@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(ConnectionError) as info:
        open_job_store(url, Path("/nonexistent"))
    text = str(info.value)
    assert "s3cret-pass" not in text and "\n" not in text and "127.0.0.1" in text
    with pytest.raises(ValueError):
        open_job_store("mysql://x", Path("/nonexistent"))


def test_the_send_ledger_keeps_every_claims_answers(store: JobStore) -> None:
    job_id = _queued(store, "11.1")
    first = store.claim(now=11000.0)
    store.record_sends(job_id, "pacs", first.lease_epoch, [("1.1", 0), ("1.2", 0), ("1.3", 0xA700)])
    store.record_sends(job_id, "pacs", first.lease_epoch, [("1.1", 0)])  # recorded once
    store.record_sends(job_id, "pacs", first.lease_epoch + 1, [("1.1", 0), ("1.2", 0), ("1.3", 0)])
    store.record_sends(job_id, "web", first.lease_epoch + 1, [])
    assert store.ledger(job_id) == {"pacs": {str(first.lease_epoch): {"stored": 2, "refused": 1},
                                             str(first.lease_epoch + 1): {"stored": 3, "refused": 0}}}
    assert store.ledger(job_id + 1) == {}


@pytest.mark.postgres
def test_a_claim_whose_holder_disconnects_is_requeued_at_once(cluster) -> None:
    """PostgreSQL drops a session's locks with the session: a dead worker's job need not wait for its lease."""
    url = cluster.create_database(f"orphans{next(_databases)}")
    holder, other = open_job_store(url, Path("/unused")), open_job_store(url, Path("/unused"))
    try:
        a, b = _queued(holder, "12.1"), _queued(holder, "12.2")
        held = holder.claim(lease_seconds=3600.0)
        kept = holder.claim(lease_seconds=3600.0)
        assert other.reap_orphans() == [] and holder.reap_orphans() == []  # alive: held
        holder.finish(kept.id, "done", "delivered", epoch=kept.lease_epoch)  # released with its transition
        holder.close()  # the process dies: its session, and its locks, go with it
        time.sleep(0.5)
        reaped = other.reap_orphans()
        assert [j.id for j in reaped] == [held.id] and reaped[0].state == "queued"  # lease far from over
        assert {a, b} == {held.id, kept.id} and other.get(kept.id).state == "done"
        again = other.claim()
        assert again.id == held.id and again.lease_epoch == held.lease_epoch + 1
        assert not other.finish(held.id, "done", "late", epoch=held.lease_epoch)
    finally:
        other.close()
