"""End to end in a real browser: Playwright drives Debian's Chromium against `streamlit run app.py`.

Register a tiny dataset, train, watch the curves grow, open the evaluation (confusion matrix, a gallery
image with its Grad-CAM), and predict an uploaded image. Screenshots go to test-artifacts/browser/; with
STUDIO_UPDATE_SCREENSHOT=1 the Evaluate page's first screen also replaces the README's docs/studio.png.
"""
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, free_port, make_dot_image, write_class_folders

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts" / "browser"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI_REQUIRE_BROWSER"),
                                 reason="Debian's chromium is not installed (the README test command installs it)")]


@pytest.fixture
def studio(tmp_path):
    port = free_port()
    env = dict(os.environ, STUDIO_WORKSPACE=str(tmp_path / "ws"))
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120  # a cold machine's first start reads every module from disk
    while time.time() < deadline:
        try:  # ready when Streamlit's own health check answers, not when the port merely opens
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + (tmp_path / "streamlit.log").read_text())
    if proc.poll() is not None:
        pytest.fail("streamlit exited: " + (tmp_path / "streamlit.log").read_text())
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    out = (tmp_path / "streamlit.log").read_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "streamlit.log").write_text(out)


def _points(page, chart_index: int) -> int:
    charts = page.locator(".js-plotly-plot")
    if charts.count() <= chart_index:
        return 0
    return charts.nth(chart_index).locator(".scatterlayer .trace .points path").count()


def _choose(page, label: str, option: str) -> None:
    """Pick an option of a Streamlit selectbox (retrying if a rerun closes the dropdown under us)."""
    box = page.get_by_role("combobox", name=re.compile(label))
    for _ in range(5):
        box.click()
        item = page.get_by_role("option", name=option, exact=True)
        try:
            item.click(timeout=5000)
            return
        except Exception:
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
    raise AssertionError(f"could not choose {option!r} in {label!r}")


def test_journey_in_a_real_browser(studio, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    data = write_class_folders(tmp_path / "parts", per_class=40, size=64, seed=2)
    rng = np.random.default_rng(9)
    img, _ = make_dot_image(rng, 64, dot=True)
    Image.fromarray(img).save(tmp_path / "new_part.png")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # Waits are for readiness (an element appearing), never a fixed time: a cold machine is slow to start.
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)

        # 1. Register the dataset
        page.goto(f"{studio}/datasets")  # a first visit straight to a sub-page still gets app.py's sidebar
        expect(page.get_by_role("heading", name="Datasets")).to_be_visible()
        expect(page.get_by_test_id("stSidebar").get_by_role("link", name="Evaluate")).to_be_visible()
        # On an empty workspace Datasets ends early (st.stop): the device is detected all the same (app.py's
        # finally; AppTest runs a page without app.py, so only a real server shows it).
        expect(page.get_by_text(re.compile(r"^Device: (CPU|CUDA|Apple)"))).to_be_visible()
        assert page.get_by_test_id("stSidebarNav").count() == 0  # Streamlit's auto-discovered list never shows
        # An empty workspace (the suite runs without the example set) opens "Add a dataset" already expanded
        # (studio/test_pages.py checks the flag). Once in a full suite on a loaded machine the browser showed it
        # collapsed, with the page otherwise complete: then it is opened as a person would.
        expect(page.get_by_text("No dataset yet: add one above.")).to_be_visible()
        if not page.get_by_text("Folder on this machine").is_visible():
            page.get_by_text("Add a dataset").click()
        expect(page.get_by_text("Folder on this machine")).to_be_visible()
        page.get_by_text("Folder on this machine").click()
        page.get_by_role("textbox", name="Folder or CSV path").fill(str(data))
        page.get_by_role("button", name="Register").click()
        expect(page.get_by_text("Registered parts: 80 images in 2 classes")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "1-datasets.png", full_page=True)

        # 2. Train, and watch the curves grow
        page.get_by_role("link", name="Train").first.click()
        expect(page.get_by_role("button", name="Start training")).to_be_visible()
        for label, value in (("Epochs", "12"), ("Image size (px)", "64"), ("Batch size", "16")):
            box = page.get_by_role("spinbutton", name=label, exact=True)
            box.fill(value)
            box.press("Enter")
        page.get_by_role("button", name="Start training").click()
        counts = []
        reloaded = False
        deadline = time.time() + 240
        while time.time() < deadline:
            counts.append(_points(page, 0))
            if not reloaded and counts[-1]:
                page.reload()  # a reload (or a new tab) reattaches to the running job
                expect(page.get_by_text(re.compile(r"^Run \S+ .*(running|done)"))).to_be_visible()
                reloaded = True
            if page.get_by_text("Open its evaluation").count():
                break
            time.sleep(0.5)
        page.screenshot(path=ARTIFACTS / "2-train.png", full_page=True)
        growth = sorted({c for c in counts if c})
        assert len(growth) >= 2, f"curves did not grow while training: {counts}"
        assert growth[-1] == 2 * 12  # train and validation points for every epoch

        # 3. Evaluation: confusion matrix, then a cell of it, then a gallery image with Grad-CAM
        page.get_by_text("Open its evaluation").click()
        expect(page.get_by_text("Confusion matrix", exact=True)).to_be_visible()
        expect(page.locator(".js-plotly-plot .heatmaplayer").first).to_be_attached()
        expect(page.get_by_text(re.compile(r"^Misclassified \(\d+\)"))).to_be_visible()
        _choose(page, "True class", "dot")
        _choose(page, "Predicted class", "dot")
        expect(page.get_by_text(re.compile(r"Correct: dot \(\d+\)"))).to_be_visible()
        gallery = page.locator('[data-testid="stImage"] img')
        expect(gallery.first).to_be_visible()
        assert gallery.count() >= 1
        page.screenshot(path=ARTIFACTS / "3-evaluate.png", full_page=True)
        if os.environ.get("STUDIO_UPDATE_SCREENSHOT"):  # the README's picture, as a person sees the page
            page.get_by_text("Confusion matrix", exact=True).scroll_into_view_if_needed()
            page.screenshot(path=ROOT / "docs" / "studio.png")

        # 3a. Calibration and Decide: a reliability diagram, a cost-based rule saved with the run
        expect(page.get_by_role("heading", name="Decide")).to_be_visible()
        expect(page.get_by_text("Threshold", exact=False).first).to_be_visible()
        page.get_by_role("button", name="Save this rule").click()
        expect(page.get_by_text("A rule is saved with this run: predictions say pass / fail / review.")).to_be_visible()
        page.get_by_role("heading", name="Decide").scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / "3a-decide.png", full_page=True)

        # 3b. Relabel one image from the gallery, and see it in the Label page's history
        page.get_by_role("button", name="Fix label").first.click()
        page.get_by_role("button", name="blank", exact=True).first.click()
        expect(page.get_by_text("label changed to blank").first).to_be_visible()
        page.get_by_role("link", name="Label").first.click()
        expect(page.get_by_text(re.compile(r"Last change: .* dot → blank · manual"))).to_be_visible()
        page.screenshot(path=ARTIFACTS / "3b-label.png", full_page=True)

        # 4. Predict an uploaded image
        page.get_by_role("link", name="Predict").first.click()
        page.locator('input[type="file"]').set_input_files(str(tmp_path / "new_part.png"))
        expect(page.get_by_text("1 of 1 images predicted")).to_be_visible()
        expect(page.get_by_text(re.compile(r"^dot · \d+(\.\d)?%$"))).to_be_visible()
        expect(page.get_by_text("Grad-CAM for dot")).to_be_visible()
        # its nearest training images, each captioned with its label and similarity
        expect(page.get_by_text(re.compile(r"^(dot|blank) · -?\d\.\d\d$")).first).to_be_visible(timeout=60_000)
        # The saved rule's verdict for a dot, as the badge (the table's grid has a hidden cell with the same text).
        expect(page.get_by_test_id("stMarkdownContainer").get_by_text("fail", exact=True).first).to_be_visible()
        page.screenshot(path=ARTIFACTS / "4-predict.png", full_page=True)

        # 5. The embedding map: a lasso around the whole plot selects every image
        page.get_by_role("link", name="Explore").first.click()
        plot = page.get_by_test_id("stPlotlyChart").first
        expect(plot).to_be_visible(timeout=60_000)
        plot.locator(".nsewdrag").first.wait_for(timeout=30_000)
        selected = page.get_by_text(re.compile(r"^\d+ selected$"))
        # A lasso drawn while the chart is still being wired up for selections is lost (seen once in CI on a
        # loaded machine): the gesture is drawn again, up to three times, until the page reports the selection.
        for attempt in range(5):
            drag = plot.locator(".nsewdrag").first
            drag.wait_for(state="visible", timeout=30_000)
            box = drag.bounding_box()
            if box is None:  # the chart was drawn again between the wait and the read (two test workers, CI)
                page.wait_for_timeout(500)
                continue
            x0, y0, x1, y1 = box["x"] + 2, box["y"] + 2, box["x"] + box["width"] - 2, box["y"] + box["height"] - 2
            page.mouse.move(x0, y0)
            page.mouse.down()
            for x, y in ((x1, y0), (x1, y1), (x0, y1), (x0, y0 + 1)):
                page.mouse.move(x, y, steps=8)
            page.mouse.up()
            try:
                expect(selected).to_be_visible(timeout=15_000)
                break
            except AssertionError:
                if attempt == 4:
                    raise
        expect(selected).to_be_visible()
        expect(page.get_by_text(re.compile(r"^(dot|blank) → (dot|blank) · (train|val|test)$")).first).to_be_visible()
        page.screenshot(path=ARTIFACTS / "5-explore.png", full_page=True)
        browser.close()
