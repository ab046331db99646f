"""What the radiologist sees: the derived series beside the original, and the SEG on it, in OHIF in a real browser.

The round trip is the product's (a scanner's series into Orthanc, Orthanc routes it to the
node over DIMSE, the node sends back the derived series, the SEG and the lesion report);
then OHIF v3, served on one origin with Orthanc's DICOMweb (``dicom_node_lab.viewer``),
opens the study in headless Chromium with software WebGL. The test reads the page (series
descriptions, "CALCIUM REMOVED", the SEG's segment labels) and the pixels (at the slice the
node changed most, the two viewports differ, only at the lesion, and the derived one is
not blank), and keeps the screenshots in ``reports/viewer/last/`` (a pair is committed in
``reports/viewer/``).
"""

from __future__ import annotations

import io
import re
import shutil
import time

import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from scipy import ndimage

from dicom_node_lab import phantom
from dicom_node_lab.peers import REPO, NodeProcess, Orthanc, free_port, need, storescu, wait_for, write_node_config
from dicom_node_lab.phantom_dicom import write_phantom_series
from dicom_node_lab.viewer import ViewerSite, ohif_dist

pytestmark = [pytest.mark.browser, pytest.mark.integration]

SHOTS = REPO / "reports" / "viewer" / "last"
LOCAL = [("ORTHANC", "127.0.0.1"), ("STORESCU", "127.0.0.1")]
SLICES = 40
# OHIF's first visit shows a guided tour and an investigational-use banner; a returning user has
# dismissed both, which is what these keys record.
RETURNING_USER = ("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
                  "localStorage.setItem('investigationalUseDialog', JSON.stringify({expiryDate: '2999-01-01'}));"
                  "sessionStorage.setItem('investigationalUseDialog', 'hidden');")
WINDOW = {"width": 1400, "height": 800}
INDEX = re.compile(r"I:\s*(\d+) \((\d+)/(\d+)\)")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc holding a phantom CTA and, back from the node, its derived series, SEG and SR; and OHIF on top."""
    ohif_dist()  # fails with the command to run when OHIF is not unpacked
    root = tmp_path_factory.mktemp("viewer")
    opts = phantom.PhantomOptions(n_vessels=(2, 2), calcified_probability=1.0, bone_probability=0.0,
                                  lesion_margin_mm=5.0)
    cta = root / "cta"
    cta.mkdir()
    write_phantom_series(phantom.generate((SLICES, 96, 96), seed=31, options=opts), cta)
    study_uid = str(pydicom.dcmread(next(cta.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    node_dicom, node_http = free_port(), free_port()
    orthanc = Orthanc(root / "orthanc", node_dicom, node_http, "dimse")
    cfg = write_node_config(root, dicom_port=node_dicom, http_port=node_http, allowed=LOCAL,
                            destinations=[{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                                           "host": "127.0.0.1", "port": orthanc.dicom_port}])
    node = NodeProcess(cfg, node_http, node_dicom, root / "node.log")
    site = None
    try:
        node.start()
        orthanc.start()
        storescu(("127.0.0.1", orthanc.dicom_port), orthanc.aet, cta)

        def back() -> dict[str, dict] | None:
            series = {s["MainDicomTags"].get("SeriesDescription", ""): s for s in orthanc.study_series(study_uid)}
            derived = [d for d, s in series.items() if d.endswith("CALCIUM REMOVED") and len(s["Instances"]) == SLICES]
            if derived and any(d.endswith(" SEG") for d in series) and any(d.endswith(" REPORT") for d in series):
                return series
            return None
        series = wait_for(back, 240, "the derived series, SEG and report in Orthanc", interval=1.0)
        site = ViewerSite(orthanc.url).start()
        yield orthanc, site, study_uid, series
    finally:
        if site is not None:
            site.stop()
        orthanc.stop()
        node.stop()


def _most_changed_instance(orthanc: Orthanc, series: dict[str, dict]) -> int:
    """The InstanceNumber of the source slice the node changed most (derived slices keep the source's)."""
    def pixels(s: dict) -> dict[int, np.ndarray]:
        out = {}
        for i in s["Instances"]:
            ds = pydicom.dcmread(io.BytesIO(orthanc.file(i)))
            out[int(ds.InstanceNumber)] = ds.pixel_array.astype(np.int32)
        return out
    original = pixels(next(s for d, s in series.items() if d.endswith("phantom")))
    derived = pixels(next(s for d, s in series.items() if d.endswith("CALCIUM REMOVED")))
    changed = {n: int((original[n] != derived[n]).sum()) for n in original}
    best = max(changed, key=changed.get)
    assert changed[best] > 0, "the derived series equals the original"
    return best


def _shown(page) -> list[tuple[int, int]]:
    """(InstanceNumber, position in the stack) each viewport's overlay shows, left to right."""
    return [(int(a), int(b)) for a, b, _ in INDEX.findall(page.inner_text("body"))]


def _scroll_to(page, canvas, viewport: int, instance: int) -> None:
    """Scroll one viewport (mouse wheel, as a reader does) until its overlay shows ``instance``."""
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(3 * SLICES):
        number, position = _shown(page)[viewport]
        if number == instance:
            return
        page.mouse.wheel(0, 100)
        time.sleep(0.15)
        if _shown(page)[viewport][1] == position:  # at the end of the stack: go the other way
            page.mouse.wheel(0, -100 * SLICES)
            time.sleep(0.5)
    raise AssertionError(f"viewport {viewport} never showed instance {instance}: {_shown(page)}")


def _pixels(canvas) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("L"), dtype=np.int16)


def _aligned(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two viewports' pixels on one grid, lightly smoothed.

    OHIF's grid makes neighbouring viewports differ by a pixel in width, so the same image lands
    up to a pixel apart: crop both to the common size at the best of the small shifts, and smooth
    away the resampling of single noise pixels (a restored lesion is many pixels across).
    """
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1]) - 2
    best = min(((dy, dx) for dy in range(3) for dx in range(3)),
               key=lambda s: np.abs(a[1:h - 1, 1:w + 1] - b[s[0]:s[0] + h - 2, s[1]:s[1] + w]).mean())
    a = a[1:h - 1, 1:w + 1].astype(np.float32)
    b = b[best[0]:best[0] + h - 2, best[1]:best[1] + w].astype(np.float32)
    return ndimage.gaussian_filter(a, 1.5), ndimage.gaussian_filter(b, 1.5)


def test_ohif_shows_the_derived_series_beside_the_original_and_the_seg_on_it(study):
    orthanc, site, study_uid, series = study
    original_desc = next(d for d in series if d.endswith("phantom"))
    instance = _most_changed_instance(orthanc, series)
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=need("chromium"),
                                     args=["--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-sandbox"])
        try:
            context = browser.new_context(viewport=WINDOW)
            context.add_init_script(RETURNING_USER)
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(site.viewer_url(study_uid))
            try:
                page.wait_for_selector("canvas.cornerstone-canvas >> nth=1", timeout=90_000)
                wait_for(lambda: len(_shown(page)) == 2, 60, "both viewports' overlays")
            except Exception:
                page.screenshot(path=str(SHOTS / "failed.png"))
                (SHOTS / "console.txt").write_text("\n".join(console))
                raise
            text = page.inner_text("body")
            for wanted in (original_desc, f"{original_desc} CALCIUM REMOVED", "CALCIUM REMOVED SEG",
                           "CALCIUM REMOVED REPORT"):
                assert wanted in text, f"{wanted!r} not on the page"
            left, right = (page.locator("canvas.cornerstone-canvas").nth(i) for i in (0, 1))
            lb = left.bounding_box()

            # Side by side at the slice the node changed most: two viewports showing the same series would
            # render the same pixels; these differ, and only where the calcium was.
            _scroll_to(page, left, 0, instance)
            _scroll_to(page, right, 1, instance)
            time.sleep(1.0)
            page.screenshot(path=str(SHOTS / "side-by-side.png"))
            a, b = _aligned(_pixels(left), _pixels(right))
            h, w = a.shape  # away from the overlays' text and icons (series names differ, by design)
            a, b = a[h // 5: h * 9 // 10, w // 10: w * 9 // 10], b[h // 5: h * 9 // 10, w // 10: w * 9 // 10]
            assert b.std() > 10, "the derived viewport is blank"
            differs = np.abs(a - b) > 30
            assert differs.sum() > 20, "the viewports show the same image at the lesion"
            assert differs.mean() < 0.05, "the viewports differ everywhere, not at the lesion"
            Image.fromarray((differs * 255).astype(np.uint8)).save(SHOTS / "difference.png")
            ys, xs = np.nonzero(differs)
            assert np.ptp(ys) < a.shape[0] / 2 and np.ptp(xs) < a.shape[1] / 2, "the difference is not one lesion"

            # The SEG onto the original (its viewport made active first): no prompt, and the segments
            # listed with their labels; then both viewports back at the lesion for the picture.
            page.mouse.click(lb["x"] + 20, lb["y"] + lb["height"] - 30)
            page.get_by_text("CALCIUM REMOVED SEG").first.dblclick()
            page.locator("[data-cy=panelSegmentation-btn]").click()
            page.wait_for_selector("text=Restored region", timeout=30_000)
            text = page.inner_text("body")
            assert "Calcium removed" in text and "Restored region" in text
            left, right = (page.locator("canvas.cornerstone-canvas").nth(i) for i in (0, 1))
            _scroll_to(page, left, 0, instance)
            _scroll_to(page, right, 1, instance)
            shown = page.inner_text("body")
            assert f"{original_desc} CALCIUM REMOVED" in shown or "CALCIUM" in shown
            time.sleep(1.0)
            page.screenshot(path=str(SHOTS / "with-seg.png"))

            # The lesion report: OHIF 3.13 reads every lesion's group (its tracking identifier reaches the
            # console), but draws and lists only measurements with image coordinates (SCOORD); ours point
            # to the SEG's segment, as TID 1411 asks (highdicom refuses coordinates in such a group).
            page.get_by_text("CALCIUM REMOVED REPORT").first.dblclick()
            wait_for(lambda: any("Lesion 1 " in line for line in console), 30, "OHIF reading the report's groups")
        finally:
            (SHOTS / "console.txt").write_text("\n".join(console))
            browser.close()
