"""--report: the page's data (written incrementally, resumable) and the page itself,
opened from file:// in Debian's headless Chromium through Selenium.

One browser session serves the whole module. Screenshots are kept in
tests/artifacts/ (not committed).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import unquote

import cv2
import pytest
from conftest import IN_CI, ROOT
from synthetic import synthetic_records

from cam_caffe import CAMNet
from cam_caffe.batch import ChunkResult, Options
from cam_caffe.commands import main
from cam_caffe.report import ReportWriter, read_cards

ARTIFACTS = ROOT / "tests" / "artifacts"
DEMO_IMAGES = sorted((ROOT / "images").glob("demo_*.png"))


# ---- a real run: the demo images, an oddly named copy and a broken file ------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("report")
    images = folder / "images"
    images.mkdir()
    for path in DEMO_IMAGES:
        shutil.copy(path, images / path.name)
    shutil.copy(DEMO_IMAGES[0], images / "odd name #1.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = folder / "out"
    code = main([str(images), "--model", "demo", "--output-dir", str(out), "--report",
                 "--top-k", "2", "--boxes", "paper", "--save", "json", "-q"])
    assert code == 1                                # one image failed, the others are done
    return images, out


def run_header(out: Path) -> dict:
    return json.loads((out / "_report" / "run.js").read_text()[len("CAM_RUN = "):-2])


def saved_records(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in (json.loads(p.read_text()) for p in out.glob("*.json"))}


def test_report_files_and_cards(demo_run):
    images, out = demo_run
    assert (out / "index.html").is_file()
    assert {"app.js", "style.css", "run.js", "data-0000.js"} <= {
        p.name for p in (out / "_report").iterdir()}
    page = (out / "index.html").read_text() + (out / "_report" / "app.js").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and \
        "https://" not in page                      # nothing remote: works offline
    run = run_header(out)
    assert run["finished"] and run["done"] == 7 and run["skipped"] == 0
    assert run["images"] == 8 and run["model"] == "demo" and run["methods"] == ["cam"]
    assert [f["image"] for f in run["failed"]] == [str(images / "broken.png")]
    cards = read_cards(out)
    assert len(cards) == 8
    records = saved_records(out)
    for card in cards:
        image = (out / unquote(card["src"])).resolve()
        assert image.is_file() and image.parent == images.resolve()
        if card.get("failed"):
            assert card["name"].endswith("broken.png") and card["error"]
            continue
        record = records[card["name"]]
        assert card["top"] == [[t["class"], t["label"], t["prob"]] for t in record["top_k"]]
        assert [m["boxes"] for m in card["maps"]] == [m["boxes"] for m in record["maps"]]
        for m in card["maps"]:
            for kind in ("thumb", "overlay", "heatmap"):
                assert (out / unquote(m[kind])).is_file()
            thumb = cv2.imread(str(out / unquote(m["thumb"])))
            assert thumb.shape[:2] == (64, 64)       # small images are not enlarged


def test_cards_name_the_method(tmp_path):
    out = tmp_path / "out"
    assert main([str(DEMO_IMAGES[0]), "--model", "demo", "--method", "gradcam", "--backend",
                 "onnxruntime", "--output-dir", str(out), "--report", "-q"]) == 0
    assert '"methods": ["gradcam"]' in (out / "_report" / "run.js").read_text()
    assert [m["method"] for m in read_cards(out)[0]["maps"]] == ["gradcam"]


def test_report_needs_output_dir(capsys):
    assert main([str(DEMO_IMAGES[0]), "--model", "demo", "--report"]) == 2
    assert "--report needs --output-dir" in capsys.readouterr().err


def test_interrupted_run_keeps_its_page_and_skip_existing_resumes_it(tmp_path, monkeypatch,
                                                                     browser):
    images = tmp_path / "images"
    images.mkdir()
    for path in DEMO_IMAGES:
        shutil.copy(path, images / path.name)
    out = tmp_path / "out"
    args = [str(images), "--model", "demo", "--output-dir", str(out), "--report",
            "--batch-size", "2", "--save", "json", "-q",
            "--workers", "0"]              # the patched load runs in this process
    load = CAMNet.load

    def interrupted(self, path, *rest):         # Ctrl-C while decoding the 3rd image
        if Path(path).name == DEMO_IMAGES[2].name:
            raise KeyboardInterrupt
        return load(self, path, *rest)
    monkeypatch.setattr(CAMNet, "load", interrupted)
    # chunks of 2: the first is reported, the second is interrupted
    assert main(args) == 130
    first = read_cards(out)
    assert [Path(c["name"]).name for c in first] == [p.name for p in DEMO_IMAGES[:2]]
    assert run_header(out)["finished"] is False
    open_page(browser, out)
    assert card_names(browser) == sorted(p.name for p in DEMO_IMAGES[:2])
    assert "incomplete" in browser.find_element("id", "facts").text
    assert console_errors(browser) == []

    monkeypatch.setattr(CAMNet, "load", load)
    assert main([*args, "--skip-existing"]) == 0
    cards, run = read_cards(out), run_header(out)
    assert run["finished"] and run["done"] + run["skipped"] == 6 and run["skipped"] >= 2
    assert sorted(Path(c["name"]).name for c in cards) == [p.name for p in DEMO_IMAGES]
    assert cards[:2] == first                   # from the page already there
    assert all(c["top"] and c["maps"] and "note" not in c for c in cards)


def test_skip_existing_builds_a_page_from_the_saved_records(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in DEMO_IMAGES[:3]:
        shutil.copy(path, images / path.name)
    for save, complete in (("json", True), ("overlay", False)):
        out = tmp_path / f"out-{save}"
        args = [str(images), "--model", "demo", "--output-dir", str(out), "--report",
                "--save", save, "-q"]
        assert main(args) == 0
        before = read_cards(out)
        shutil.rmtree(out / "_report")          # e.g. shards that each wrote their own page
        assert main([*args, "--skip-existing"]) == 0
        assert run_header(out)["skipped"] == 3
        if complete:                            # each card again, from its .json
            assert read_cards(out) == before
        else:                                   # no record saved: the names, and a note
            assert [c["name"] for c in read_cards(out)] == [c["name"] for c in before]
            assert all(c["note"] and not c["maps"] for c in read_cards(out))


def test_a_page_cam_caffe_did_not_write_is_never_replaced(tmp_path, capsys):
    """A user's own index.html (or _report/ file) where the page would go: the run
    stops before any image with one line naming it; --overwrite replaces it, and
    the page is the run's own from then on."""
    out = tmp_path / "out"
    (out / "_report").mkdir(parents=True)
    (out / "index.html").write_text("my page")
    run = [str(DEMO_IMAGES[0]), "--model", "demo", "--output-dir", str(out), "--report", "-q"]
    assert main(run) == 5
    assert capsys.readouterr().err.splitlines()[0] == (
        f"cam-caffe: error: {out / 'index.html'}: exists and was not written by cam-caffe; "
        "--overwrite replaces it")
    assert (out / "index.html").read_text() == "my page"
    assert not list(out.glob("*.png"))
    (out / "index.html").unlink()
    (out / "_report" / "style.css").write_text("mine too")
    assert main(run) == 5
    assert (out / "_report" / "style.css").read_text() == "mine too"
    assert main([*run, "--overwrite"]) == 0
    assert main(run) == 0                           # a rerun replaces its own page
    assert "window.CAM_PARTS" in (out / "index.html").read_text()


def test_writer_flushes_every_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("cam_caffe.report.CHUNK", 4)
    records = synthetic_records(tmp_path, 10)
    writer = ReportWriter(tmp_path, {"model": "m", "backend": "b", "methods": ["cam"],
                                     "images": 10}, Options(output_dir=tmp_path))
    for start in range(0, 10, 3):
        writer.add(ChunkResult(3, records=records[start:start + 3]))
        assert [c["name"] for c in read_cards(tmp_path)] == [
            r["image"] for r in records[:start + 3]]
    assert sorted(p.name for p in (tmp_path / "_report").glob("data-*.js")) == [
        "data-0000.js", "data-0001.js", "data-0002.js"]
    writer.close()
    assert '"finished": true' in (tmp_path / "_report" / "run.js").read_text()


# ---- the page in a real browser ------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by chromedriver; skipped outside CI only."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        chromium = None
        why = f"selenium is not installed: {e}"
    else:
        why = "chromium and chromium-driver are not installed (scripts/setup.sh installs them)"
    if not (chromium and driver):
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(options=options, service=Service(driver))
    ARTIFACTS.mkdir(exist_ok=True)
    yield session
    session.quit()


def open_page(browser, out: Path) -> None:
    """Open the report and wait until its first cards are drawn."""
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get((out / "index.html").as_uri())
    WebDriverWait(browser, 15).until(lambda d: d.execute_script(
        "return performance.getEntriesByName('cam-cards').length"))


def console_errors(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def card_names(browser) -> list[str]:
    return [Path(h.get_attribute("title")).name
            for h in browser.find_elements("css selector", "article.card h2")]


def set_value(browser, element_id: str, value: str) -> None:
    """Type into a control as a person would (the page listens to input events)."""
    element = browser.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def test_page_sorts_filters_searches_and_shows_full_size(browser, demo_run):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    _images, out = demo_run
    records = saved_records(out)
    open_page(browser, out)
    assert console_errors(browser) == []
    assert len(browser.find_elements("css selector", "article.card")) == 8
    by_confidence = sorted(records.values(), key=lambda r: (-r["top_k"][0]["prob"],
                                                             Path(r["image"]).name))
    assert card_names(browser) == [Path(r["image"]).name for r in by_confidence] + ["broken.png"]
    assert "Showing 1–8 of 8 images" in browser.find_element("id", "status").text
    browser.save_screenshot(str(ARTIFACTS / "report-demo.png"))

    sort = Select(browser.find_element("id", "sort"))
    sort.select_by_value("name-asc")
    assert card_names(browser) == sorted(card_names(browser), key=str.lower)
    assert card_names(browser) != [Path(r["image"]).name for r in by_confidence] + ["broken.png"]
    sort.select_by_value("prob-asc")
    assert card_names(browser)[0] == Path(by_confidence[-1]["image"]).name

    classes = Select(browser.find_element("id", "class"))
    classes.select_by_visible_text("circle")
    circles = [r for r in records.values() if r["top_k"][0]["label"] == "circle"]
    assert len(circles) == 3 and len(card_names(browser)) == 3
    classes.select_by_value("")

    set_value(browser, "pmin", "0.999")
    confident = [r for r in records.values() if r["top_k"][0]["prob"] >= 0.999]
    assert 0 < len(confident) < 7
    assert sorted(card_names(browser)) == sorted(Path(r["image"]).name for r in confident)
    set_value(browser, "pmin", "0")

    set_value(browser, "search", "STAR")
    assert card_names(browser) == ["demo_star_4.png"]
    set_value(browser, "search", "#1")
    assert card_names(browser) == ["odd name #1.png"]
    set_value(browser, "search", "")

    browser.find_element("id", "failed").click()
    assert card_names(browser) == ["broken.png"]
    assert "Failed:" in browser.find_element("css selector", "article.card").text
    browser.find_element("id", "failed").click()

    boxes = browser.find_element("css selector", "svg.boxes rect")
    assert boxes.is_displayed()
    browser.find_element("id", "boxes").click()
    assert not boxes.is_displayed()
    browser.find_element("id", "boxes").click()

    # keyboard: Enter on a thumbnail opens the full-size views, Escape closes them
    set_value(browser, "search", "#1")
    thumb = browser.find_element("css selector", "button.thumb")
    assert thumb.find_element("css selector", "img").get_attribute("alt").startswith("cam map of")
    browser.execute_script("arguments[0].focus()", thumb)
    assert browser.switch_to.active_element == thumb        # a thumbnail takes the focus
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    viewer = browser.find_element("id", "viewer")
    assert viewer.get_attribute("open") is not None
    widths = browser.execute_script(
        "return Promise.all([...document.querySelectorAll('#viewer-body img')].map("
        "i => i.decode().then(() => i.naturalWidth, () => 0)))")
    assert widths == [64, 64, 64]    # overlay, heatmap, original
    browser.save_screenshot(str(ARTIFACTS / "report-viewer.png"))
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()
    assert viewer.get_attribute("open") is None
    set_value(browser, "search", "")
    assert browser.execute_script(      # every image says what it shows
        "return [...document.images].every(i => i.alt.trim().length > 10)")
    # printed: the cards without the controls
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    assert not browser.find_element("id", "controls").is_displayed()
    assert len([c for c in browser.find_elements("css selector", "article.card")
                if c.is_displayed()]) == 8
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    assert console_errors(browser) == []


def test_page_pages_through_many_cards_with_two_methods(browser, tmp_path, monkeypatch):
    from selenium.webdriver.support.ui import Select
    monkeypatch.setattr("cam_caffe.report.CHUNK", 50)
    records = synthetic_records(tmp_path, 130, methods=("cam", "gradcam"))
    writer = ReportWriter(tmp_path, {"model": "synthetic", "backend": "none",
                                     "methods": ["cam", "gradcam"], "images": 130},
                          Options(output_dir=tmp_path))
    for start in range(0, 130, 16):
        writer.add(ChunkResult(16, records=records[start:start + 16]))
    writer.close()
    open_page(browser, tmp_path)
    assert console_errors(browser) == []
    cards = browser.find_elements("css selector", "article.card")
    assert len(cards) == 48
    captions = [c.text for c in cards[0].find_elements("css selector", "figcaption")]
    assert [c.split(" · ")[0] for c in captions] == ["cam", "gradcam"]   # side by side
    browser.save_screenshot(str(ARTIFACTS / "report-two-methods.png"))
    pager = browser.find_element("css selector", "nav.pager")
    for shown in ("49–96", "97–130"):
        pager.find_elements("tag name", "button")[1].click()
        assert f"Showing {shown} of 130 images" in browser.find_element("id", "status").text
    assert len(browser.find_elements("css selector", "article.card")) == 34
    Select(browser.find_element("id", "sort")).select_by_value("name-desc")
    assert card_names(browser)[0] == "img_00129.png"        # a new order starts at page 1


def test_shards_sharing_a_folder_make_one_page(browser, tmp_path):
    """The shards of a job array, one output folder: each writes its own part and the
    same index.html, which shows every shard's cards under one header."""
    out = tmp_path / "out"
    pages = []
    for shard in ("1/2", "0/2"):
        assert main([str(ROOT / "images"), "--model", "demo", "--output-dir", str(out),
                     "--report", "--shard", shard, "--save", "json", "-q"]) == 0
        pages.append((out / "index.html").read_bytes())
    assert pages[0] == pages[1]
    parts = [{Path(c["name"]).name for c in read_cards(out, (i, 2))} for i in range(2)]
    demo = {p.name for p in (ROOT / "images").iterdir() if p.suffix in (".png", ".jpg")}
    assert parts[0] | parts[1] == demo and not parts[0] & parts[1]
    open_page(browser, out)
    assert console_errors(browser) == []
    assert sorted(card_names(browser)) == sorted(demo)
    facts = browser.find_element("id", "facts").text
    assert f"{len(demo)} — {len(demo)} done" in facts and "2 of 2 have written" in facts
    browser.save_screenshot(str(ARTIFACTS / "report-shards.png"))


def test_report_of_a_run_into_its_input_folder_does_not_take_thumbnails_as_inputs(tmp_path):
    for path in DEMO_IMAGES[:3]:
        shutil.copy(path, tmp_path / path.name)
    args = [str(tmp_path), "--model", "demo", "--output-dir", str(tmp_path), "--report", "-q"]
    assert main(args) == 0 and len(list(tmp_path.glob("*.thumb.jpg"))) == 3
    assert main(args) == 0
    assert sorted(Path(c["name"]).name for c in read_cards(tmp_path)) == [
        p.name for p in DEMO_IMAGES[:3]]
