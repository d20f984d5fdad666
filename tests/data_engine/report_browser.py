"""Open a report in Debian's headless chromium and read back what a person would see.

Driven over the DevTools protocol on `--remote-debugging-pipe` (NUL-delimited JSON on file
descriptors 3 and 4): no websocket library and no browser package from pip. Network events give
every URL the page requested, `Runtime.evaluate` reads the DOM and each image's natural width,
`Page.captureScreenshot` gives the pixels.

Run as a script to take the README screenshot of a written report:
    .venv/bin/python tests/data_engine/report_browser.py demo_data/report docs/report.png
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VIEWPORT = (1280, 1800)  # CSS pixels of the screenshot
_TIMEOUT_S = 60.0

# Collected in the page after the load event: every image has finished loading or failing then.
_PROBE_JS = """(() => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'),
      complete: i.complete, naturalWidth: i.naturalWidth}));
  const charts = [...document.querySelectorAll('[data-chart]')].map(c => ({
      key: c.dataset.chart, declared: Number(c.dataset.bars),
      drawn: c.querySelectorAll('svg [id*="-bar-"]').length}));
  const sections = [...document.querySelectorAll('section[data-section]')].map(s => ({
      id: s.dataset.section, heading: s.querySelector('h2') ? s.querySelector('h2').textContent : '',
      anchor: s.querySelector('h2 a') ? s.querySelector('h2 a').getAttribute('href') : '',
      text: s.innerText}));
  return {imgs, charts, sections, html: document.documentElement.outerHTML,
          height: document.documentElement.scrollHeight};
})()"""


def find_chromium() -> str:
    """The chromium binary; the tests fail (not skip) without it: `.ci/run` installs it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")


@dataclass
class PageReport:
    """What the browser saw of one page."""

    screenshot_png: bytes
    probe: dict[str, Any]
    requested_urls: list[str]
    failed_requests: list[str]
    console: list[str] = field(default_factory=list)


class _Pipe:
    """One DevTools connection over the browser's fds 3 (commands in) and 4 (messages out)."""

    def __init__(self, write_fd: int, read_fd: int) -> None:
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            event = self._read()
            if event.get("method") == method:
                return event
            self.events.append(event)

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + _TIMEOUT_S
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("chromium sent nothing for 60 s")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


def _high_fd(fd: int) -> int:
    """An inheritable duplicate of `fd` numbered 10 or more; `fd` is closed."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    os.set_inheritable(high, True)
    return high


def render(index_html: Path) -> PageReport:
    """Load `index_html` from disk in headless chromium and collect what it shows."""
    commands_r, commands_w = os.pipe()
    messages_r, messages_w = os.pipe()

    # The child's pipe ends are inherited and moved to fds 3 and 4 by the shell; no
    # preexec_fn, so subprocess spawns without fork() (lance warns on fork). Both ends are
    # first moved to fds >= 10, so neither is itself 3 or 4 when the shell redirects.
    commands_r, messages_w = _high_fd(commands_r), _high_fd(messages_w)
    with tempfile.TemporaryDirectory(prefix="stiv-chromium-") as profile:
        browser = subprocess.Popen(
            [
                "/bin/bash",  # dash cannot redirect fds above 9
                "-c",
                f'exec "$0" "$@" 3<&{commands_r} 4>&{messages_w} {commands_r}<&- {messages_w}>&-',
                find_chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
        )
        os.close(commands_r)
        os.close(messages_w)
        try:
            return _drive(_Pipe(commands_w, messages_r), index_html)
        finally:
            os.close(commands_w)
            os.close(messages_r)
            try:
                browser.wait(timeout=10)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait()


def _drive(pipe: _Pipe, index_html: Path) -> PageReport:
    target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Network", "Page", "Runtime", "Log"):
        pipe.send(f"{domain}.enable", {}, session)
    width, height = VIEWPORT
    pipe.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    pipe.send("Page.navigate", {"url": index_html.absolute().as_uri()}, session)
    pipe.wait_event("Page.loadEventFired")
    probe = pipe.send(
        "Runtime.evaluate", {"expression": _PROBE_JS, "returnByValue": True}, session
    )["result"]["value"]
    shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
    pipe.send("Browser.close")
    events = pipe.events
    urls = [
        e["params"]["request"]["url"]
        for e in events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    failed = [
        f"{e['params'].get('errorText')} {e['params'].get('blockedReason', '')}"
        for e in events
        if e.get("method") == "Network.loadingFailed"
    ]
    console = [
        e["params"]["entry"].get("text", "") for e in events if e.get("method") == "Log.entryAdded"
    ]
    return PageReport(base64.b64decode(shot), probe, urls, failed, console)


if __name__ == "__main__":
    report_dir, png = Path(sys.argv[1]), Path(sys.argv[2])
    result = render(report_dir / "index.html")
    png.write_bytes(result.screenshot_png)
    print(f"{png}: {len(result.screenshot_png):,} bytes, {len(result.requested_urls)} requests")
