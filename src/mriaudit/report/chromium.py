"""Headless Chromium driven over the DevTools protocol on a pipe (no driver, no websocket).

The report's browser tests and the report budget of ``mriaudit.bench`` (load time
and first paint of a 1,000-subject page) open the page with it.

Chromium reads commands from fd 3 and writes replies and events to fd 4, each
message JSON ended by a NUL byte (``--remote-debugging-pipe``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

# Without the background-networking flags Chromium calls home at start-up (and is refused here).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _above_9(fd: int) -> int:
    """``fd`` moved to the lowest free descriptor above 9 (close-on-exec)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """One Chromium process and one page; events are kept in ``events`` as they arrive."""

    def __init__(self, executable: str, profile: Path, *, window: tuple[int, int] = (1400, 1000)):
        # The pipes live above fd 9, so fds 3 and 4 of the child are free to wire, whatever
        # this process holds there (a test runner's capture files, or nothing at all).
        to_chrome_r, self._to_chrome = (_above_9(fd) for fd in os.pipe())
        self._from_chrome, from_chrome_w = (_above_9(fd) for fd in os.pipe())

        def wire_pipes() -> None:  # in the child, before exec: the protocol's fds 3 and 4
            # dup2 makes 3 and 4 inheritable; every other fd of ours is close-on-exec.
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes,
            close_fds=False,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                message = "no answer from Chromium in time"
                raise TimeoutError(message)
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                message = "Chromium closed the DevTools pipe"
                raise ConnectionError(message)
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, *, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """Send one command (to the page's session once attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if getattr(self, "session", None) and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    error = f"{method}: {reply['error']}"
                    raise RuntimeError(error)
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """The first event ``method`` (already received or still to come)."""
        for event in self.events:
            if event["method"] == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            if "method" in event:
                self.events.append(event)
                if event["method"] == method:
                    return event

    def evaluate(self, expression: str, *, timeout: float = 30.0) -> Any:
        """Value of a JS expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            error = f"JS error: {result['exceptionDetails']}"
            raise RuntimeError(error)
        return result["result"].get("value")

    def screenshot(self, path: Path, *, selector: str | None = None) -> Path:
        """A PNG of the whole page, or of the element ``selector`` finds (scrolled into view)."""
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if selector is not None:
            box = self.evaluate(
                f"(function () {{ var e = document.querySelector({json.dumps(selector)});"
                " e.scrollIntoView({block: 'start'}); var r = e.getBoundingClientRect();"
                " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width,"
                " height: r.height}; })()"
            )
            params["clip"] = {**box, "scale": 1}
        data = self.call("Page.captureScreenshot", **params)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, ConnectionError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def page_timings(page: Path, profile: Path) -> dict[str, float] | None:
    """Seconds until ``page``'s load event and its first (contentful) paint, in a fresh
    headless Chromium; None when no Chromium is installed."""
    executable = find_chromium()
    if executable is None:
        return None
    browser = Browser(executable, profile)
    try:
        browser.call("Page.enable")
        started = time.monotonic()
        browser.call("Page.navigate", url=Path(page).resolve().as_uri())
        browser.wait_for("Page.loadEventFired", timeout=120)
        load_s = time.monotonic() - started
        paints = browser.evaluate(
            "Object.fromEntries(performance.getEntriesByType('paint')"
            ".map(function (p) { return [p.name, p.startTime]; }))"
        )
    finally:
        browser.close()
    return {
        "load_s": round(load_s, 2),
        "first_paint_s": round(paints.get("first-paint", math.nan) / 1000, 2),
        "first_contentful_paint_s": round(paints.get("first-contentful-paint", math.nan) / 1000, 2),
    }
