"""The built-in status page (`GET /ui`) rendered by a real headless Chromium (Debian's `chromium`) against a
gateway that served real traffic: the page's script must have filled in the routing mix, cost and savings,
latency percentiles and worker health, and the test takes a screenshot of it.

`TURNOUT_SAVE_SCREENSHOT=1` also copies the screenshot to `loadtest/results/status_page.png` (the committed one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from testkit.procs import free_port, system_binary
from tests.conftest import Upstream, fake_config, serve_gateway

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "loadtest" / "results" / "status_page.png"
pytestmark = pytest.mark.timeout(300)


def headless(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once. `--virtual-time-budget` lets the page's script (and its fetch) finish
    before the DOM is dumped or the screenshot taken. Root in a container needs `--no-sandbox`."""
    cmd = [system_binary("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True)


class Cells(HTMLParser):
    """The text of every table row of the rendered page, by table id, and the text of elements with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.by_id: dict[str, str] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ident = dict(attrs).get("id")
        if tag == "table" and ident:
            self._table = ident
            self.tables[ident] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif ident:
            self._id = ident
            self.by_id[ident] = ""

    def handle_endtag(self, tag: str) -> None:
        self._id = None
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif self._id is not None:
            self.by_id[self._id] += data.strip()


def test_status_page_renders_live_numbers(fakes: dict[str, Upstream], fake_reset: None, tmp_path: Path) -> None:
    config: dict[str, Any] = fake_config(fakes)
    config["workers"].append({"name": "ghost", "model": "ghost-model", "base_url": f"http://127.0.0.1:{free_port()}/v1"})
    proc, url = serve_gateway(config, tmp_path)
    with proc:
        deadline = time.monotonic() + 30
        while sum(w["health"] == "up" for w in httpx.get(f"{url}/readyz").json()["workers"].values()) < 2:
            assert time.monotonic() < deadline, "the fake workers never came up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for i in range(12):
            model = "turnout/split" if i % 2 else "turnout/cheap"
            if i % 3 == 0:
                for _ in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=4, stream=True):
                    pass
            else:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        status = httpx.get(f"{url}/ui/status.json").json()
        assert status["requests"] == 12 and status["reference_model"] == "fake-big"

        dom = headless("--dump-dom", f"{url}/ui").stdout
        page = Cells()
        page.feed(dom)
        assert page.by_id.get("error", "") == "", page.by_id["error"]
        assert page.by_id["requests"] == "12"
        assert page.by_id["cost"].startswith("$") and page.by_id["savings"].startswith("$")
        assert page.by_id["refmodel"] == "fake-big"
        mix = {(r[0], r[1]): int(r[2]) for r in page.tables["mix"][1:]}
        assert sum(n for (p, _), n in mix.items() if p == "cheap") == 6 and mix[("cheap", "small")] == 6
        assert sum(n for (p, _), n in mix.items() if p == "split") == 6
        models = {r[0]: r for r in page.tables["models"][1:]}
        assert int(models["fake-small"][1]) + int(models.get("fake-big", ["", "0"])[1]) == 12
        assert re.fullmatch(r"[0-9.]+ / [0-9.]+", models["fake-small"][5]), models["fake-small"]  # latency p50 / p99
        workers = {r[0]: r for r in page.tables["workers"][1:]}
        assert workers["small"][2] == "up" and workers["big"][2] == "up" and workers["ghost"][2] == "down"

        shot = tmp_path / "status_page.png"
        headless(f"--screenshot={shot}", "--window-size=1200,900", f"{url}/ui")
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, "a blank page compresses to a few KB"
        if os.environ.get("TURNOUT_SAVE_SCREENSHOT") == "1":
            shutil.copy(shot, COMMITTED)
