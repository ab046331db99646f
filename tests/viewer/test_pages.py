"""The node's own pages in a real browser: the jobs list and a job's page with its lesions' pictures.

A PACS administrator opens the node's address in a browser. With bearer tokens configured the
pages ask for one and read the API with it (nothing shows without it); without tokens they
load directly. The list refreshes its data in place, and stays usable with a hundred jobs.
Screenshots go to ``reports/viewer/last/``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests
import uvicorn
from playwright.sync_api import sync_playwright

from dicom_node.node.http import create_app
from dicom_node.node.intake import Intake
from dicom_node.node.jobs import JobStore
from dicom_node.node.metrics import Metrics
from dicom_node.node.spool import Spool
from dicom_node_lab import phantom
from dicom_node_lab.peers import REPO, NodeProcess, free_port, need, storescu, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series

pytestmark = [pytest.mark.browser, pytest.mark.integration]

SHOTS = REPO / "reports" / "viewer" / "last"
TOKEN = "page-test-token-0123456789abcdef"
VIEWER = "http://pacs.invalid/ohif/viewer?StudyInstanceUIDs={study}"
CHROMIUM_ARGS = ["--enable-unsafe-swiftshader", "--no-sandbox"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory):
    """A node with a bearer token and a viewer link, holding one processed phantom study (no destinations)."""
    root = tmp_path_factory.mktemp("pages")
    cta = root / "cta"
    cta.mkdir()
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                  lesion_margin_mm=5.0)
    write_phantom_series(phantom.generate((40, 96, 96), seed=31, options=opts), cta)
    dicom, http = free_port(), free_port()
    cfg = write_node_config(root, dicom_port=dicom, http_port=http, destinations=[],
                            allowed=[("STORESCU", "127.0.0.1")],
                            extra={"http": [f'tokens = ["{TOKEN}"]'], "viewer": [f'url_template = "{VIEWER}"']})
    node = NodeProcess(cfg, http, dicom, root / "node.log")
    try:
        node.start()
        storescu(("127.0.0.1", dicom), "DICOMNODE", cta)
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def done() -> dict | None:
            jobs = requests.get(f"{node.url}/jobs", headers=auth, timeout=5).json()
            if jobs and jobs[0]["state"] == "failed":
                pytest.fail(f"job failed: {jobs[0]['reason']}")
            return jobs[0] if jobs and jobs[0]["state"] == "done" else None
        job = wait_for(done, 240, "the job processed", interval=1.0)
        yield node, job
    finally:
        node.stop()


def _browser(pw):
    return pw.chromium.launch(executable_path=need("chromium"), args=CHROMIUM_ARGS)


def test_the_pages_ask_for_the_token_then_show_the_job_its_lesions_and_pictures(processed):
    node, job = processed
    assert job["pictures"] and job["viewer_url"] == VIEWER.format(study=job["study_uid"])
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(node.url + "/")
            page.wait_for_selector("#auth", state="visible", timeout=15_000)
            assert page.locator("#jobs tr").count() == 0, "job rows shown without a token"
            page.fill("#token", "not-the-token-0123456789")
            page.click("#auth button")
            page.wait_for_selector("text=That token was refused", timeout=15_000)
            page.fill("#token", TOKEN)
            page.click("#auth button")
            row = page.locator(f"#job-{job['id']}")
            row.wait_for(timeout=15_000)
            assert "done" in row.inner_text() and job["description"] in row.inner_text()
            thumb = row.locator("img.thumb")
            wait_for(lambda: thumb.evaluate("i => i.complete && i.naturalWidth > 0"), 15, "the thumbnail")
            page.screenshot(path=str(SHOTS / "jobs.png"))

            row.locator("a").click()
            page.wait_for_url(f"**/jobs/{job['id']}")
            page.wait_for_selector("#lesions tr", timeout=15_000)
            lesions = page.locator("#lesions tr")
            assert lesions.count() == len(job["lesions"])
            first = lesions.nth(0).inner_text()
            assert str(job["lesions"][0]["lesion"]) in first and "HU" in first  # the confidence column
            pictures = page.locator("#pictures img")
            assert pictures.count() == len(job["pictures"])
            wait_for(lambda: all(pictures.nth(i).evaluate("i => i.complete && i.naturalWidth > 100")
                                 for i in range(pictures.count())), 20, "every lesion picture")
            assert page.get_attribute("#viewer-link", "href") == job["viewer_url"]
            facts = page.inner_text("#facts")
            assert "sending" in facts or "finished" in facts
            assert "processing steps (s)" in facts and "detect " in facts and "write " in facts
            page.screenshot(path=str(SHOTS / "job.png"), full_page=True)
        finally:
            browser.close()


@pytest.fixture
def hundred_jobs(tmp_path: Path):
    """The node's HTTP app, without tokens, over a job store holding a hundred jobs."""
    spool = Spool(tmp_path / "spool")
    store = JobStore(spool.db_path)
    now = time.time()
    for i in range(100):
        store.note_instance(f"1.2.3.{i}", "1.2.3", f"series {i}", now=now + i)
    metrics = Metrics(store)
    app = create_app(store, Intake(spool, store, metrics), metrics, {"ae_title": "DICOMNODE"},
                     pictures=spool.pictures_root)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "the HTTP app")
    try:
        yield f"http://127.0.0.1:{port}", store
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def test_the_list_refreshes_in_place_and_keeps_up_with_a_hundred_jobs(hundred_jobs):
    url, store = hundred_jobs
    with sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(url + "/")
            wait_for(lambda: page.locator("#jobs tr").count() == 100, 15, "a hundred rows")
            assert not page.locator("#auth").is_visible()  # no tokens configured: no prompt
            page.evaluate("document.getElementById('job-1').dataset.mark = 'kept'; window.loaded = true")
            newest = store.list(limit=1)[0]
            store.finish(newest.id, "failed", "refused: a test reason")
            wait_for(lambda: "refused: a test reason" in page.inner_text(f"#job-{newest.id}"), 15,
                     "the changed job's row updated")
            assert page.evaluate("window.loaded === true"), "the page was reloaded"
            assert page.get_attribute("#job-1", "data-mark") == "kept", "an unchanged row was rebuilt"
            assert page.locator("#jobs tr").count() == 100
        finally:
            browser.close()
