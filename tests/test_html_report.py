"""report.html (evaluation/html_report.py): report.md's tables, every image and audio file it
names present beside it, its values escaped, and a headless Chromium that renders it and loads
its images and audio. Without a ``chromium`` on PATH the browser test skips, unless
``HIFI_TSE_REQUIRE_BROWSER=1`` (CI), which makes it fail."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
from config import load_config, model_kwargs
from dsp.audio import SAMPLE_RATE
from dsp.files import write_text_atomic
from evaluation import html_report, report
from evaluation.metrics import MetricSettings, column
from evaluation.sources import TA, TP, UNKNOWN, Sample, Skipped
from models.registry import build_model, checkpoint_payload

REPO = Path(__file__).resolve().parents[1]
REQUIRE_BROWSER = "HIFI_TSE_REQUIRE_BROWSER"
BROWSERS = ("chromium", "chromium-browser")
BROWSER_TIMEOUT_S = 60
CONDITIONS = (TP, TP, TA, TP, UNKNOWN, TP)
HOSTILE_ID = '<img src="x" onerror="alert(1)"> & co'  # must reach the page as text
SECONDS = 0.5
AUDIO_TAGS = {"audio", "source"}
HAVE_METADATA = 1  # HTMLMediaElement.readyState once the duration is known


class Page(HTMLParser):
    """What a page links to, its tables as cell texts, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, list[str]] = {"img": [], "audio": [], "a": []}
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "img":
            self.links["img"].append(attr["src"] or "")
        elif tag in AUDIO_TAGS and attr.get("src"):
            self.links["audio"].append(attr["src"] or "")
        elif tag == "a":
            self.links["a"].append(attr["href"] or "")
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The tables of report.md as cell texts (code marks dropped, as the HTML shows them)."""
    tables: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([c.strip().replace("`", "") for c in line.strip("|").split(" | ")])
        previous = line
    return tables


def _wave(rng: np.random.Generator, seconds: float) -> np.ndarray:
    return (0.1 * rng.standard_normal(round(seconds * SAMPLE_RATE))).astype(np.float32)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """An evaluation folder written by the report functions from synthetic rows (as evaluate.py
    writes it, without a model), and its summary."""
    out = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    columns = MetricSettings(groups=("core",)).columns()
    rows = []
    for i, cond in enumerate(CONDITIONS):
        row = {"id": f"s{i}", "condition": cond, "n_interferers": 1 + i % 2,
               "snr_db": float(3 * i - 6), "ref_noisy": bool(i % 2), "sir_db": None,
               "seconds": SECONDS, "notes": "pesq: crashed" if i == 1 else ""}
        rows.append(row | {c: float(rng.normal()) if cond in column(c).conditions else math.nan
                           for c in columns})
    # The first sample's estimate is closer to its interferer: a worst-confusion example.
    rows[0] |= {"confusion": 1.0, "si_sdr_interferer": rows[0]["si_sdr"] + 3.0}
    summary = report.summarize(rows, columns, [-5.0, 0.0, 5.0])
    report.plot_histogram(out / report.HIST_NAME,
                          [r["si_sdri"] for r in rows if r["condition"] == TP])

    def estimate_of(index: int) -> tuple[Sample, np.ndarray]:
        sample = Sample(rows[index]["id"], _wave(rng, SECONDS), _wave(rng, 0.3),
                        _wave(rng, SECONDS))
        return sample, _wave(rng, SECONDS)

    examples = report.write_examples(out, report.pick_examples(rows), rows, estimate_of)
    info = {"checkpoint": "runs/x/best.pt", "arch": "hifi_tse", "step": 1200, "weights": "EMA",
            "source": "synthetic", "n_samples": len(rows), "n_skipped": 1,
            "skipped": [Skipped(HOSTILE_ID, "empty")],
            **{f"n_{c.lower()}": sum(r["condition"] == c for r in rows)
               for c in report.CONDITIONS},
            "generator_params": 123_456,
            "settings": {"metrics": "core", "long_inputs": {"core": "whole"}},
            "examples": examples}
    write_text_atomic(out / report.REPORT_NAME, report.render_report(info, summary, rows, columns))
    write_text_atomic(out / html_report.HTML_NAME,
                      html_report.render_html(info, summary, rows, columns))
    return out, summary


def test_html_has_the_tables_of_report_md(evaluation: tuple[Path, dict[str, Any]]) -> None:
    out, summary = evaluation
    page = parse(out / html_report.HTML_NAME)
    tables = markdown_tables((out / report.REPORT_NAME).read_text(encoding="utf-8"))
    # report.md's last table links the examples; the page shows them as figures and players.
    assert page.tables == tables[:-1]
    assert len(page.tables) == 4  # headline, distributions, breakdown, failures
    headline = page.tables[0][1]
    assert headline[0] == "this checkpoint"
    assert headline[2] == report.fmt(summary["metrics"]["si_sdri"]["mean"], "+.2f")
    assert headline[1] == report.fmt(summary["metrics"]["si_sdr"]["mean"])
    assert [t[0] for t in page.tables[2][1:4]] == ["all", TP, TA]  # the breakdown's groups


def test_every_image_and_audio_file_exists(evaluation: tuple[Path, dict[str, Any]]) -> None:
    out, _ = evaluation
    page = parse(out / html_report.HTML_NAME)
    labels = (*report.EXAMPLE_LABELS, f"{report.CONFUSION_LABEL}_1")
    assert page.links["img"] == [report.HIST_NAME,
                                 *(f"examples/{label}_spectrogram.png" for label in labels)]
    assert len(page.links["audio"]) == 4 * len(labels)
    for src in (*page.links["img"], *page.links["audio"], *page.links["a"]):
        assert not Path(src).is_absolute()
        assert (out / src).is_file(), src


def test_values_are_escaped(evaluation: tuple[Path, dict[str, Any]]) -> None:
    out, _ = evaluation
    page = parse(out / html_report.HTML_NAME)
    assert "x" not in page.links["img"]
    assert HOSTILE_ID in "".join(page.text)


@pytest.fixture(scope="session")
def browser() -> str:
    """The Chromium binary (a session fixture: the test skips before its evaluation is made)."""
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        reason = f"no {' or '.join(BROWSERS)} on PATH (Debian: apt-get install chromium)"
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_BROWSER}=1")
        pytest.skip(reason)
    return found


# A test-only page that loads the report in a frame and writes into its own DOM, for
# --dump-dom, what the browser made of it: tables, and each image and audio element's state.
PROBE = """<!DOCTYPE html>
<html><body>
<iframe id="report" src="$REPORT" style="width: 1280px; height: 2000px"></iframe>
<pre id="result"></pre>
<script>
window.addEventListener("load", async () => {
  const doc = document.getElementById("report").contentDocument;
  const audio = [...doc.querySelectorAll("audio")];
  await Promise.all(audio.map((a) => a.readyState >= 1 || a.error ? null
    : new Promise((done) => { a.onloadedmetadata = done; a.onerror = done; })));
  document.getElementById("result").textContent = JSON.stringify({
    tables: [...doc.querySelectorAll("table")].map((t) =>
      [...t.rows].map((r) => [...r.cells].map((c) => c.textContent))),
    images: [...doc.images].map((i) => ({src: i.getAttribute("src"),
      loaded: i.complete && i.naturalWidth > 0, width: i.getBoundingClientRect().width})),
    audio: audio.map((a) => ({src: a.getAttribute("src"), ready: a.readyState,
      error: a.error && a.error.code})),
  });
});
</script>
</body></html>
"""


def test_browser_renders_the_tables_and_loads_every_image_and_audio(
    browser: str, evaluation: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = evaluation
    probe = tmp_path / "probe.html"
    probe.write_text(PROBE.replace("$REPORT", (out / html_report.HTML_NAME).as_uri()))
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found is not None, f"no probe in the DOM: {done.stderr[-2000:]}"
    assert found.group(1), f"the probe wrote nothing: {done.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    page = parse(out / html_report.HTML_NAME)
    assert result["tables"] == page.tables
    shown = [i["src"] for i in result["images"] if i["loaded"] and i["width"] > 0]
    assert shown == page.links["img"], result["images"]
    playable = [a["src"] for a in result["audio"]
                if a["error"] is None and a["ready"] >= HAVE_METADATA]
    assert playable == page.links["audio"], result["audio"]


def _triplets(root: Path) -> Path:
    rng = np.random.default_rng(1)
    t = np.arange(round(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    for i, sample in enumerate(("a", "b", "c")):
        target = 0.1 * np.sin(2 * np.pi * (150 + 40 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t))
        mix = target + 0.05 * rng.standard_normal(t.size)
        for kind, wave in (("mixed", mix), ("ref", np.roll(target, 999)), ("target", target)):
            sf.write(root / f"{sample}-{kind}.wav", wave.astype(np.float32), SAMPLE_RATE,
                     subtype="FLOAT")
    return root


@pytest.mark.slow
def test_evaluate_writes_report_html(tmp_path: Path) -> None:
    """evaluate.py itself, on a tiny untrained model: report.html beside report.md, with
    every file it names."""
    cfg = load_config(REPO / "configs" / "td_speakerbeam_tiny.yaml")
    torch.manual_seed(0)
    model = build_model(model_kwargs(cfg)).eval()
    ckpt = tmp_path / "td.pt"
    torch.save(checkpoint_payload(model, model_kwargs(cfg)) | {"ema": None}, ckpt)
    triplets = tmp_path / "triplets"
    triplets.mkdir()
    out = tmp_path / "out"
    evaluate.main(["--ckpt", str(ckpt), "--out-dir", str(out), "--triplets",
                   str(_triplets(triplets)), "--metrics", "core", "--jobs", "0"])
    page = parse(out / html_report.HTML_NAME)
    assert page.tables == markdown_tables((out / report.REPORT_NAME).read_text())[:-1]
    assert len(page.links["img"]) == 1 + len(report.EXAMPLE_LABELS)
    for src in (*page.links["img"], *page.links["audio"]):
        assert (out / src).is_file(), src


def test_worst_confusions_are_picked_closest_to_an_interferer_first() -> None:
    def row(condition: str, si_sdri: float, confusion: float, margin: float) -> dict[str, Any]:
        return {"condition": condition, "si_sdri": si_sdri, "si_sdr": 0.0,
                "confusion": confusion, "si_sdr_interferer": margin}

    rows = [row(TP, 5.0, 0.0, -9.0), row(TP, -4.0, 1.0, 2.0), row(TA, math.nan, 1.0, 9.0),
            row(TP, -8.0, 1.0, 6.0), row(TP, 1.0, 1.0, 4.0), row(TP, 0.0, math.nan, math.nan)]
    picks = report.pick_examples(rows)
    assert picks == {"best": 0, "median": 5, "worst": 3, "confusion_1": 3, "confusion_2": 4}
    assert report.pick_examples([row(TP, 1.0, 0.0, -3.0)]) == {"best": 0, "median": 0,
                                                                 "worst": 0}
