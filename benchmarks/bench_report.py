"""``--report`` at scale: a page of 1,000 and 10,000 cards (made-up records with
real 32×32 JPEG thumbnails, ``tests/synthetic.py``), written
by the report writer in batches of 16 as a run would, then opened from file://
in Debian's headless Chromium (Selenium, chromium-driver).

Per size: the data written (MB, chunk files), the writer's time (all batches,
and the slowest batch), and in the browser, from the Performance API, medians
of ``--repeat`` fresh page loads: first contentful paint, the first page of
cards drawn (the page's ``cam-cards`` mark), the load event; then a search and
a re-sort of all cards (ms from the control's event to the redrawn page).

    python benchmarks/bench_report.py [--sizes 1000,10000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import shutil
import time

from common import WORK, median, table, title

SEARCH_AND_SORT = """
const timings = [];
for (const [id, value] of [["search", "img_01"], ["search", ""], ["sort", "name-desc"]]) {
  const control = document.getElementById(id);
  control.value = value;
  const start = performance.now();
  control.dispatchEvent(new Event("input"));
  timings.push(performance.now() - start);
}
return timings;
"""


def chromium():
    """A headless Debian Chromium session."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def write_report(count: int) -> tuple[object, float, float]:
    """The report of ``count`` cards, written in batches of 16: (folder, total s,
    slowest batch s)."""
    from synthetic import synthetic_records

    from cam_caffe.batch import ChunkResult, Options
    from cam_caffe.report import ReportWriter
    folder = WORK / f"report-{count}"
    shutil.rmtree(folder, ignore_errors=True)
    records = synthetic_records(folder, count)
    start = time.perf_counter()
    writer = ReportWriter(folder, {"model": "synthetic", "backend": "none", "methods": ["cam"],
                                   "images": count}, Options(output_dir=folder))
    slowest = 0.0
    for i in range(0, count, 16):
        batch_start = time.perf_counter()
        writer.add(ChunkResult(16, records=records[i:i + 16]))
        slowest = max(slowest, time.perf_counter() - batch_start)
    writer.close()
    return folder, time.perf_counter() - start, slowest


def page_timings(browser, folder, repeat: int) -> dict[str, float]:
    """Medians over ``repeat`` fresh loads, ms."""
    from selenium.webdriver.support.ui import WebDriverWait
    samples: dict[str, list[float]] = {"fcp": [], "cards": [], "load": [], "search": [],
                                       "clear": [], "sort": []}
    for _ in range(repeat):
        browser.get("about:blank")
        browser.get((folder / "index.html").as_uri())
        WebDriverWait(browser, 60).until(lambda d: d.execute_script(
            "return performance.getEntriesByName('cam-cards').length"))
        fcp, cards, load = browser.execute_script("""
            const paint = performance.getEntriesByName('first-contentful-paint')[0];
            return [paint ? paint.startTime : NaN,
                    performance.getEntriesByName('cam-cards')[0].startTime,
                    performance.getEntriesByType('navigation')[0].loadEventEnd];""")
        search, clear, sort = browser.execute_script(SEARCH_AND_SORT)
        for key, value in zip(samples, (fcp, cards, load, search, clear, sort), strict=True):
            samples[key].append(value)
    return {key: median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    browser = chromium()
    try:
        for count in (int(s) for s in args.sizes.split(",")):
            folder, writing, slowest = write_report(count)
            data = sorted((folder / "_report").glob("data-*.js"))
            size = sum(p.stat().st_size for p in data) / 2 ** 20
            t = page_timings(browser, folder, args.repeat)
            rows.append([f"{count:,}", f"{size:.1f} MB in {len(data)}", f"{writing:.2f} s",
                         f"{slowest * 1000:.1f} ms", f"{t['fcp']:.0f}", f"{t['cards']:.0f}",
                         f"{t['load']:.0f}", f"{t['search']:.1f}", f"{t['sort']:.1f}"])
    finally:
        browser.quit()
    title(f"--report page in headless Chromium (medians of {args.repeat} loads, ms)")
    print(table(["cards", "data (chunk files)", "writing, all batches", "slowest batch",
                 "first contentful paint", "first cards drawn", "load event",
                 "search", "re-sort"], rows))


if __name__ == "__main__":
    main()
