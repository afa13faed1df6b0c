"""Drive a headless Chromium over the DevTools protocol, with nothing but the standard library.

Used by the ``browser`` tests (and handy by hand: ``python -m tests.viz.chromium page.html
out.png``). Chromium is started with ``--remote-debugging-pipe``: it reads protocol commands
from file descriptor 3 and writes replies and events to descriptor 4, as NUL-terminated JSON,
so no websocket client is needed. Console messages, uncaught exceptions, log entries (failed
loads) and every network request are recorded while the page loads.

Nothing is installed: :func:`find_chromium` looks for ``chromium``, ``chromium-browser``,
``google-chrome`` (and ``google-chrome-stable``) on ``PATH`` and returns None when there is
none, so the tests can skip.
"""

from __future__ import annotations

import base64
import contextlib
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

__all__ = ["CHROMIUM_FLAGS", "PageReport", "find_chromium", "load_page"]

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def find_chromium() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    console: list[str] = field(default_factory=list)  # console.error/warn/assert and exceptions
    log_errors: list[str] = field(default_factory=list)  # Log.entryAdded at level error (failed loads)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    screenshot: bytes = b""
    values: dict = field(default_factory=dict)  # results of the expressions asked for

    @property
    def problems(self) -> list[str]:
        return self.console + self.log_errors


class _Pipe:
    def __init__(self, proc, wfd: int, rfd: int) -> None:
        self.proc, self.wfd, self.rfd = proc, wfd, rfd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.wfd, json.dumps(msg).encode() + b"\0")
        want = self.next_id
        deadline = time.monotonic() + timeout
        while True:
            for m in self._read(deadline):
                if m.get("id") == want:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})
                self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == method:
                    return self.events.pop(i)
            self.events.extend(self._read(deadline))

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.extend(self._read(deadline))
        except TimeoutError:
            pass

    def _read(self, deadline: float) -> list[dict]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from chromium")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rfd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        out = []
        while b"\0" in self.buf:
            raw, self.buf = self.buf.split(b"\0", 1)
            out.append(json.loads(raw))
        return out


def _preexec(to_chrome: int, from_chrome: int):
    def run():  # in the child: fd 3 = commands in, fd 4 = replies out
        a = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)
    return run


def load_page(path: str | Path, *, width: int = 1280, evaluate: dict[str, str] | None = None,
              chromium: str | None = None, full_page: bool = True, settle: float = 0.5) -> PageReport:
    """Open ``path`` in headless Chromium; record problems, take a screenshot, evaluate JS."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH")
    url = Path(path).resolve().as_uri()
    report = PageReport()
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="nlc-chromium-") as profile:
        proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=_preexec(to_r, from_w))  # noqa: PLW1509 - tests run single-threaded
        os.close(to_r)
        os.close(from_w)
        pipe = _Pipe(proc, to_w, from_r)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.send(f"{domain}.enable", session=sid)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=sid)
            pipe.send("Page.navigate", {"url": url}, session=sid)
            pipe.wait_event("Page.loadEventFired")
            pipe.drain(settle)
            for name, expr in (evaluate or {}).items():
                res = pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sid)
                if "exceptionDetails" in res:
                    report.values[name] = {"error": res["exceptionDetails"].get("text")}
                else:
                    report.values[name] = res.get("result", {}).get("value")
            params = {"format": "png"}
            if full_page:
                size = pipe.send("Page.getLayoutMetrics", session=sid)["cssContentSize"]
                h = int(min(size["height"], 16000))
                w = int(max(width, min(size["width"], 8000)))
                pipe.send("Emulation.setDeviceMetricsOverride",
                          {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False}, session=sid)
                params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
            shot = pipe.send("Page.captureScreenshot", params, session=sid)
            report.screenshot = base64.b64decode(shot["data"])
            pipe.drain(0.1)
        finally:
            with contextlib.suppress(Exception):  # the browser may already be gone
                pipe.send("Browser.close", timeout=5)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_w)
            os.close(from_r)
    for m in pipe.events:
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            report.console.append(f"console.{p['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            report.console.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            report.log_errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            report.requests.append(p.get("request", {}).get("url", ""))
    return report


if __name__ == "__main__":  # python -m tests.viz.chromium page.html out.png
    rep = load_page(sys.argv[1])
    Path(sys.argv[2]).write_bytes(rep.screenshot)
    print("problems:", rep.problems or "none")
    print("requests:", rep.requests)
