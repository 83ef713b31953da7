"""Open an HTML file in headless Chromium, screenshot it, and report what a person would see broken.

``check_html(path)`` drives Debian's ``chromium`` over the Chrome DevTools Protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in a NUL byte, commands on the browser's fd 3,
answers on its fd 4), with the standard library only. It returns the screenshot's path and a list
of problems:

* a console error, an uncaught exception or an error logged by the browser (e.g. a resource that
  failed to load or was refused);
* a request for anything but a data: URI or the file itself (the Kubeflow UI shows artifacts in a
  sandbox without network, so a report must be self-contained);
* a broken image (not loaded, or 0 pixels wide);
* an empty chart: an ``<svg>`` that draws no data mark (polyline, circle, path or bar) or has no size.

Use: ``shot, problems = check_html(path); assert not problems``. ``broken_links(path)`` lists the page's
links that are not relative or name no existing file (or, for ``#id``, no element of the page); the
``screenshot_dir`` fixture is where the tests keep their screenshots. Where no Chromium is installed
``BROWSER`` is None and ``browser_required()`` says whether that is a failure (REQUIRE_BROWSER=1, as
CI sets) or a skip.
"""

from __future__ import annotations

import base64
import fcntl
import html.parser
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

BROWSER = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                if (found := shutil.which(name))), None)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe")
WIDTH, HEIGHT, MAX_HEIGHT = 1280, 900, 8000

# Runs in the page after it loaded; returns what is broken as a JSON string.
_INSPECT = r"""
(() => {
  const problems = [];
  document.querySelectorAll('img').forEach((img, i) => {
    if (!img.complete || img.naturalWidth === 0) {
      problems.push(`broken image #${i} (${(img.alt || img.src).slice(0, 80)})`);
    }
  });
  document.querySelectorAll('svg').forEach((svg, i) => {
    const box = svg.getBoundingClientRect();
    const marks = svg.querySelectorAll('polyline, circle, path, rect.bin, [data-mark]');
    const label = svg.getAttribute('aria-label') || `svg #${i}`;
    if (box.width === 0 || box.height === 0) problems.push(`empty chart: ${label} has no size`);
    else if (marks.length === 0) problems.push(`empty chart: ${label} draws no data`);
  });
  return JSON.stringify({problems, images: document.images.length,
                         charts: document.querySelectorAll('svg').length,
                         height: Math.ceil(document.documentElement.scrollHeight),
                         text: document.body ? document.body.innerText.length : 0});
})()
"""


class BrowserError(RuntimeError):
    """Chromium did not start, answer or finish in time."""


class _Pipe:
    """A DevTools Protocol session with one Chromium process over its debugging pipe."""

    def __init__(self, timeout: float):
        self.profile = tempfile.mkdtemp(prefix="imgclf-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # Move the browser's ends above 9, clear of the fds 3 and 4 the shell puts them on.
        to_browser_read, from_browser_write = (_above_nine(to_browser_read), _above_nine(from_browser_write))
        # The shell puts our pipe ends on fds 3 and 4 of the browser, where --remote-debugging-pipe expects them.
        script = f'exec "$@" 3<&{to_browser_read} 4>&{from_browser_write} {to_browser_read}<&- {from_browser_write}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", script, "bash", BROWSER, *FLAGS, f"--user-data-dir={self.profile}",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            pass_fds=(to_browser_read, from_browser_write), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.deadline = time.monotonic() + timeout
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            reply = self._receive()
            if reply.get("method") == method:
                return reply
            if "method" in reply:
                self.events.append(reply)

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    error = self.process.stderr.read().decode(errors="replace")[-2000:] if self.process.stderr else ""
                    raise BrowserError(f"Chromium closed its pipe (exit {self.process.poll()}): {error}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close")
                except (BrowserError, OSError):
                    pass
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if self.process.stderr:
                self.process.stderr.close()
            shutil.rmtree(self.profile, ignore_errors=True)


def _above_nine(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


def check_html(path: str | os.PathLike, screenshot: str | os.PathLike | None = None,
               timeout: float = 60.0) -> tuple[Path, list[str]]:
    """Load ``path`` in headless Chromium; return (PNG screenshot of the whole page, problems).

    The screenshot goes to ``screenshot`` (default: beside the file, ``<name>.png``).
    """
    if BROWSER is None:
        raise BrowserError("no Chromium found (apt-get install chromium)")
    page = Path(path).resolve()
    shot = Path(screenshot) if screenshot else page.with_suffix(page.suffix + ".png")
    problems: list[str] = []
    browser = _Pipe(timeout)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        found = json.loads(browser.send("Runtime.evaluate", {"expression": _INSPECT, "returnByValue": True},
                                        session=session)["result"]["value"])
        problems += found["problems"]
        if found["text"] == 0:
            problems.append("the page shows no text")
        height = min(max(found["height"], HEIGHT), MAX_HEIGHT)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        image = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        shot.write_bytes(base64.b64decode(image))
        problems += _event_problems(browser.events, page.as_uri())
    finally:
        browser.close()
    return shot, problems


def _event_problems(events: list[dict], own_url: str) -> list[str]:
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"uncaught exception: {description}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in args)
            problems.append(f"console {params['type']}: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            where = entry.get("url", "")
            problems.append(f"browser error ({entry.get('source')}): {entry.get('text')} {where}".strip())
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith("data:") and url != own_url:
                problems.append(f"request outside the page: {url[:120]}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            problems.append(f"a resource failed to load: {params.get('errorText')}")
    return problems


def browser_required() -> bool:
    return os.environ.get("REQUIRE_BROWSER", "0") == "1"


def require_browser() -> None:
    """Skip (or, with REQUIRE_BROWSER=1, fail) the calling test when no Chromium is installed."""
    if BROWSER is None:
        message = "NOT RUN - no Chromium installed (apt-get install chromium); the browser tier needs it"
        if browser_required():
            pytest.fail(message.replace("NOT RUN", "FAILED"))
        pytest.skip(message)


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(found["id"])
        if tag == "a" and found.get("href") is not None:
            self.hrefs.append(found["href"])


def broken_links(path: str | os.PathLike) -> tuple[list[str], list[Path]]:
    """(problems, files linked) of a page's ``<a href>`` links: each must be relative (no scheme, no leading
    slash, so the folder can move) and name a file or folder that exists, or ``#id`` an element of the page."""
    page = Path(path).resolve()
    anchors = _Anchors()
    anchors.feed(page.read_text(encoding="utf-8"))
    problems, files = [], []
    for href in anchors.hrefs:
        parts = urlsplit(href)
        if parts.scheme or parts.netloc or href.startswith("/"):
            problems.append(f"not a relative link: {href}")
        elif not parts.path:
            if parts.fragment not in anchors.ids:
                problems.append(f"no element with id {parts.fragment!r}: {href}")
        elif not (page.parent / unquote(parts.path)).exists():
            problems.append(f"links a missing file: {href}")
        else:
            files.append(page.parent / unquote(parts.path))
    return problems, files


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    """Where the browser tests keep their screenshots: IMGCLF_SCREENSHOT_DIR, or a pytest temp folder."""
    folder = Path(os.environ.get("IMGCLF_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
