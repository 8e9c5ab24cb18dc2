"""Headless Chromium for tests, driven over the DevTools protocol on a pipe: the standard library only.

    chromium_path() -> str | None      $CHROMIUM, else /usr/bin/chromium (Debian's `chromium` package); None if absent
    require_chromium() -> str          the path; pytest.skip when absent, pytest.fail when $CI is set (CI must run them)
    Browser()                          context manager: one headless chromium, fresh profile, killed on exit
        page = browser.new_page(width=1280, height=900)
        page.goto(url)                 navigate and wait for the load event
        page.eval(js)                  evaluate an expression (promises awaited) and return its JSON value
        page.wait_for(js, timeout=30)  poll until the expression is truthy; returns its value
        page.screenshot() -> bytes     PNG of the viewport
        page.requests                  every URL the page requested (Network.requestWillBeSent), in order
        page.errors                    uncaught exceptions and console errors
    browser.image_stats(png) -> dict   {width, height, colours, non_white}: the PNG decoded by the browser itself

Why a pipe and not playwright/selenium: `--remote-debugging-pipe` needs no driver binary matched to the browser
version and no package beyond Python itself; the browser is whatever Debian ships. Messages are JSON objects
separated by NUL bytes, read from the browser on fd 4 and written to it on fd 3.

    with Browser() as b:
        page = b.new_page()
        page.goto("file:///tmp/report.html")
        assert page.eval("document.querySelectorAll('.tt-tok').length") > 0
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LAUNCH_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def chromium_path() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and Path(cand).exists():
            return cand
    return None


def require_chromium() -> str:
    import pytest

    path = chromium_path()
    if path is None:
        msg = "chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}: CI must run the browser tests")
        pytest.skip(msg)
    return path


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, path: str | None = None, timeout: float = 60.0):
        self.path = path or chromium_path()
        if self.path is None:
            raise BrowserError("chromium not found")
        self.timeout = timeout
        self._next_id = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._events: list[dict] = []
        self._listeners: list = []
        self._closed = False
        self.proc: subprocess.Popen | None = None

    # --- process and pipe -------------------------------------------------------------------------------
    def __enter__(self) -> "Browser":
        self._profile = tempfile.mkdtemp(prefix="trait-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds():  # the browser reads commands on fd 3 and writes replies on fd 4
            hi_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            hi_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [self.path, *LAUNCH_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
            preexec_fn=child_fds, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self.send("Browser.getVersion")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.proc and self.proc.poll() is None:
                try:
                    self._write({"id": 10 ** 9, "method": "Browser.close"})
                    self.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def _write(self, msg: dict) -> None:
        data = json.dumps(msg).encode() + b"\0"
        with self._lock:
            while data:
                n = os.write(self._to_browser, data)
                data = data[n:]

    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._closed_pipe = True
                    self._cond.notify_all()
                return
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            with self._cond:
                for raw in msgs:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        for fn in self._listeners:
                            fn(msg)
                        self._events.append(msg)
                self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._write(msg)
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while mid not in self._replies:
                if getattr(self, "_closed_pipe", False):
                    raise BrowserError(f"chromium exited during {method}: {self._stderr_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"{method}: no reply in {timeout or self.timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str | None, since: int, timeout: float | None = None) -> dict:
        """The first event `method` of `session` at index >= since in the event log."""
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while True:
                for ev in self._events[since:]:
                    if ev.get("method") == method and ev.get("sessionId") == session:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"no {method} event in {timeout or self.timeout} s")
                self._cond.wait(left)

    def _stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            return self.stderr.read().decode(errors="replace")[-2000:]
        except (OSError, ValueError):
            return ""

    # --- pages ------------------------------------------------------------------------------------------
    def new_page(self, width: int = 1280, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for method in ("Page.enable", "Network.enable", "Runtime.enable"):
            self.send(method, session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        return page

    def image_stats(self, png: bytes) -> dict:
        """Decode a PNG in a blank page (canvas) and count its colours and its non-white pixels."""
        page = self.new_page(200, 200)
        try:
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            return page.eval(
                "new Promise(function (ok, bad) { var im = new Image(); im.onerror = bad; im.onload = function () {"
                " var c = document.createElement('canvas'); c.width = im.width; c.height = im.height;"
                " var g = c.getContext('2d'); g.drawImage(im, 0, 0);"
                " var d = g.getImageData(0, 0, c.width, c.height).data, seen = new Set(), nonWhite = 0;"
                " for (var i = 0; i < d.length; i += 4) { var k = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2];"
                "   seen.add(k); if (k !== 0xffffff) nonWhite++; }"
                " ok({width: c.width, height: c.height, colours: seen.size, non_white: nonWhite}); };"
                f" im.src = {json.dumps(url)}; }})")
        finally:
            page.close()


class Page:
    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session
        self.requests: list[str] = []
        self.errors: list[str] = []
        browser._listeners.append(self._on_event)

    def _on_event(self, ev: dict) -> None:
        if ev.get("sessionId") != self.session:
            return
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append((d.get("exception") or {}).get("description") or d.get("text", "exception"))
        elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))

    def send(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def goto(self, url: str, timeout: float | None = None) -> None:
        since = len(self.browser._events)
        reply = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if reply.get("errorText"):
            raise BrowserError(f"cannot open {url}: {reply['errorText']}")
        self.browser.wait_event("Page.loadEventFired", self.session, since, timeout)

    def eval(self, expression: str, timeout: float | None = None) -> Any:
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                      timeout=timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"{(d.get('exception') or {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout} s waiting for: {expression}")
            time.sleep(interval)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        try:
            self.send("Target.closeTarget", {"targetId": self.target})
        finally:
            if self._on_event in self.browser._listeners:
                self.browser._listeners.remove(self._on_event)


def screenshot(url: str, out: str | Path, width: int = 1280, height: int = 900, script: str | None = None,
               ready: str = "document.readyState === 'complete'") -> dict:
    """Open `url`, wait for `ready`, run `script` (e.g. a click), write a PNG of the viewport; its image_stats."""
    with Browser() as b:
        page = b.new_page(width, height)
        page.goto(url)
        page.wait_for(ready)
        if script:
            page.eval(script)
            time.sleep(0.3)
        png = page.screenshot()
        Path(out).write_bytes(png)
        return {**b.image_stats(png), "requests": page.requests, "errors": page.errors}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="PNG screenshot of a page in headless Chromium (docs/report.png).",
                                 epilog="example: python tests/browser.py experiments/demo/analysis/report/single_trait_instruct_vs_lora.html "
                                        "docs/report.png --script \"TraitReport.select(0, 30)\"")
    ap.add_argument("page", help="an HTML file or a URL")
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--script", default=None, help="JavaScript run before the screenshot")
    ap.add_argument("--ready", default="window.TraitReport ? TraitReport.timing.firstRender !== null : "
                                       "document.readyState === 'complete'", help="wait until this is truthy")
    a = ap.parse_args()
    target = a.page if "://" in a.page else Path(a.page).resolve().as_uri()
    print(json.dumps(screenshot(target, a.out, a.width, a.height, a.script, a.ready)))
