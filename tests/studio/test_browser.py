"""Vesper Studio in a real browser (headless Chromium driven by Playwright): a 3-step
run started from the New run form whose loss arrives live, its drawn loss chart once
finished, Stop on a running run, and text streamed in Chat. Saves a screenshot of each
page (into $STUDIO_SCREENSHOTS when set: docs/images/studio is made this way)."""
import os
import re
import shutil

import pytest

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
  pytest.skip("no Chromium on PATH (Debian's chromium package; .ci/run installs it)",
              allow_module_level=True)

from tests.studio.server import FORM, TOY, Server, make_data  # noqa: E402
from vesperjax.bench.optimizers import ARMS  # noqa: E402
from vesperjax.studio.app import create_app  # noqa: E402

expect = sync_api.expect
# how many pixels of a chart's canvas uPlot has drawn on
INKED = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""


def test_studio_in_a_real_browser(tmp_path):
  server = Server(create_app(str(tmp_path / "runs"), [make_data(tmp_path)], max_jobs=2))
  shots = os.environ.get("STUDIO_SCREENSHOTS") or str(tmp_path / "screenshots")
  os.makedirs(shots, exist_ok=True)
  url = f"http://127.0.0.1:{server.port}/"
  # a long run to stop later, started first so that its start-up overlaps the rest
  r = server.http.post("/api/jobs/train", json={**FORM, "name": "long", "steps": 100000})
  assert r.status_code == 201, r.text
  try:
    with sync_api.sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
      page = browser.new_page(viewport={"width": 1360, "height": 900})
      errors = []
      page.on("pageerror", lambda e: errors.append(str(e)))

      page.goto(url + "#/new")
      page.fill("#name", "three")
      page.select_option("#dataset", "corpus.txt")
      page.fill("#tokenizer", "byte")
      page.fill("#model", ", ".join(f"{k}={v}" for k, v in TOY.items()))
      page.fill("#steps", "3")
      page.fill("#seq_len", "16")
      page.screenshot(path=os.path.join(shots, "new-run.png"), full_page=True)
      page.click("#start")
      expect(page).to_have_url(re.compile(r"#/run/three$"))
      loss_chart = page.locator(".chart").first
      expect(loss_chart).to_have_attribute("data-points", re.compile(r"^[1-9]"),
                                           timeout=180_000)  # arrived live, over SSE
      expect(page.locator("#state .state")).to_have_text("finished", timeout=120_000)
      page.reload()  # the finished run, drawn from its history
      expect(loss_chart).to_have_attribute("data-points", "3", timeout=30_000)
      assert loss_chart.locator("canvas").evaluate(INKED) > 200
      page.screenshot(path=os.path.join(shots, "finished-run.png"), full_page=True)

      page.goto(url + "#/run/long")
      expect(page.locator(".chart").first).to_have_attribute(
          "data-points", re.compile(r"^[1-9]"), timeout=180_000)
      page.click("#stop")
      expect(page.locator("#state .state")).to_have_text("stopped", timeout=120_000)
      page.reload()  # its whole history, drawn again
      expect(page.locator(".chart").first).to_have_attribute("data-points",
                                                             re.compile(r"^[1-9]"))
      page.screenshot(path=os.path.join(shots, "run.png"))

      page.goto(url + "#/")
      expect(page.locator('tr[data-run="three"] .state')).to_have_text("finished")
      expect(page.locator('tr[data-run="long"] .state')).to_have_text("stopped")
      page.screenshot(path=os.path.join(shots, "runs.png"), full_page=True)
      page.goto(url + "#/compare?runs=three,long")
      expect(page.locator(".chart").first).to_have_attribute("data-points",
                                                             re.compile(r"^[1-9]"))
      page.screenshot(path=os.path.join(shots, "compare.png"), full_page=True)
      page.goto(url + "#/benchmark")
      expect(page.locator("input.arm")).to_have_count(len(ARMS))  # one box per arm
      assert page.locator("input.arm").evaluate_all("els => els.map(e => e.value)") == list(ARMS)
      page.screenshot(path=os.path.join(shots, "benchmark.png"), full_page=True)

      page.goto(url + "#/chat?run=long")  # a few thousand steps: text, not noise
      page.fill("#prompt", "def ")
      page.fill("#max_tokens", "24")
      page.click("#send")
      expect(page.locator("#stats")).to_contain_text("tokens in", timeout=120_000)
      assert len(page.locator("#out").text_content()) > len("def ")
      page.screenshot(path=os.path.join(shots, "chat.png"), full_page=True)
      assert errors == [], errors
      browser.close()
  finally:
    server.close()
  assert os.path.getsize(os.path.join(shots, "run.png")) > 10_000
