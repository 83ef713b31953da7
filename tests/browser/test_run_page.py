"""The run page a local run writes (OUTPUT/index.html), opened in headless Chromium: no console error, no
request outside the page, every link relative and naming a file that exists, and the reports a person looks
for linked from it: validation report, evaluation report, training curves, model card (and, for
`imgclf tune`, the trials report).

The pages come from one real `imgclf run-local` and one real `imgclf tune` through kfp.local, on three
small classes of pictures (small_cnn, 16 px, one epoch; the search: two trials in two lanes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main as imgclf
from tests.support.browser import broken_links, check_html, require_browser
from tests.support.datasets import make_image_folder
from trainer import layout

FIXED = ["--set", "model=small_cnn", "--set", "weights=none", "--set", "image_size=16", "--set", "epochs=1"]


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """{"run": the run page of `imgclf run-local`, "tune": that of `imgclf tune`}."""
    require_browser()  # before the runs, which are only worth it with a browser
    root = tmp_path_factory.mktemp("runs")
    make_image_folder(root / "data", {"cats": 12, "dogs": 12, "fish": 12}, size=(40, 30), fmt="jpg")
    assert imgclf(["run-local", "--data", str(root / "data"), "--output", str(root / "run"), *FIXED,
                   "--set", "batch_size=8"]) == 0
    ranges = root / "ranges.yaml"
    ranges.write_text("learning_rate: {min: 0.001, max: 0.1, scaling: Logarithmic}\n")
    assert imgclf(["tune", "--data", str(root / "data"), "--output", str(root / "tune"), *FIXED,
                   "--ranges", str(ranges), "--strategy", "Random", "--max-trials", "2",
                   "--parallel-trials", "2"]) == 0
    return {"run": root / "run" / layout.RUN_PAGE_FILE, "tune": root / "tune" / layout.RUN_PAGE_FILE}


@pytest.mark.parametrize("name", ["run", "tune"])
def test_run_page_opens_cleanly_and_every_link_resolves(name, pages, screenshot_dir):
    require_browser()
    shot, problems = check_html(pages[name], screenshot_dir / f"run_page_{name}.png")
    assert not problems, "; ".join(problems)
    assert shot.stat().st_size > 5_000
    problems, files = broken_links(pages[name])
    assert not problems, "\n".join(problems)
    # Every step's log, the reports, and the files of the model folder are linked.
    assert sum(path.name == layout.STEP_LOG_FILE for path in files) >= 6
    assert any(path.name == layout.KERAS_MODEL_FILE for path in files)


REPORTS = {"run": ["validate-data-report_html", "evaluate-evaluation_report", "evaluate-training_curves"],
           "tune": ["validate-data-report_html", "evaluate-evaluation_report", "evaluate-training_curves",
                    "select-best-trial-report_html"]}


@pytest.mark.parametrize("name", ["run", "tune"])
def test_run_page_links_the_reports_and_shows_the_model_card(name, pages, screenshot_dir):
    require_browser()
    page = pages[name].read_text(encoding="utf-8")
    _, files = broken_links(pages[name])
    linked = {path.stem for path in files if path.parent.name == layout.RUN_REPORTS_DIR}
    assert set(REPORTS[name]) <= linked
    assert "<h1>Model card" in page and "Known weak classes" in page  # rendered from the model_card Markdown
    assert "<h2>Steps</h2>" in page and page.count('class="succeeded"') >= 6
    # The linked copies are the reports themselves, and open cleanly as pages of their own.
    report = pages[name].parent / layout.RUN_REPORTS_DIR / f"{REPORTS[name][-1]}.html"
    _, problems = check_html(report, screenshot_dir / f"run_page_{name}_{report.stem}.png")
    assert not problems, "; ".join(problems)
