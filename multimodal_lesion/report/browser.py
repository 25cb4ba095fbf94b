"""Drive Debian's headless Chromium over the Chrome DevTools Protocol, for report tests and screenshots.

Only the system ``chromium`` is used (never a client that downloads its own browser), talking
CDP over one websocket (``websocket-client``). The browser gets a throw-away profile, a random
debugging port (read back from ``DevToolsActivePort``) and every background-network feature off.
Every wait has a deadline, and the context manager always ends the browser and removes its
profile, so a test can never hang or leak a process::

    with HeadlessChromium() as browser:
        page = browser.open("out/index.html")       # waits for the load event
        assert not page.console_errors and not browser.broken_images()
        title = browser.evaluate("document.querySelector('h1').textContent")
        browser.screenshot("shot.png")
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multimodal_lesion.errors import MMLesionError
from multimodal_lesion.io import atomic_write

#: Executable names tried on PATH, in order (Debian ships ``chromium``).
CHROMIUM_NAMES: tuple[str, ...] = ("chromium", "chromium-browser")
#: Environment variable naming a Chromium executable explicitly.
CHROMIUM_ENV = "MMLESION_CHROMIUM"
#: Flags for a quiet, isolated, headless browser that never reaches the network on its own.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--disable-dev-shm-usage", "--disable-breakpad",
    "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0",
)
#: The browser websocket path Chromium writes on the second line of ``DevToolsActivePort``.
_BROWSER_PATH = re.compile(r"/devtools/browser/[0-9a-fA-F-]{36}")
#: JavaScript listing every <img> with whether it loaded (``naturalWidth > 0``).
_IMAGES_JS = """Array.from(document.images).map(i => ({
  src: (i.currentSrc || i.src || '').slice(0, 120), complete: i.complete,
  naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}))"""


class BrowserError(MMLesionError):
    """Chromium could not be started, did not answer in time, or refused a command."""


@dataclass
class PageLoad:
    """What happened while a page loaded: its URL and title, console errors, requested URLs."""

    url: str
    title: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def find_chromium() -> str | None:
    """The Chromium executable: ``$MMLESION_CHROMIUM`` or the first of ``CHROMIUM_NAMES`` on PATH."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return shutil.which(explicit)
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class HeadlessChromium:
    """One headless Chromium with one page, driven over CDP; use it as a context manager.

    Args:
        executable: Chromium binary (default: :func:`find_chromium`).
        timeout: seconds allowed for start-up and for each command or page load.
        window_size: viewport (width, height) in CSS pixels.
    """

    def __init__(self, executable: str | None = None, *, timeout: float = 20.0,
                 window_size: tuple[int, int] = (1280, 900)) -> None:
        self.executable = executable
        self.timeout = timeout
        self.window_size = window_size
        self._proc: subprocess.Popen | None = None
        self._tmp: Path | None = None
        self._ws: Any = None
        self._session: str | None = None
        self._next_id = 0
        self._errors: list[str] = []
        self._requests: list[str] = []
        self._lifecycle: set[tuple[str, str]] = set()
        self._handlers: dict[str, Callable[[dict], None]] = {
            "Runtime.consoleAPICalled": self._on_console,
            "Runtime.exceptionThrown": self._on_exception,
            "Log.entryAdded": self._on_log,
            "Network.requestWillBeSent": self._on_request,
            "Page.lifecycleEvent": self._on_lifecycle,
            "Inspector.detached": self._on_detached,
            "Target.targetCrashed": self._on_detached,
        }

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> HeadlessChromium:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Launch Chromium, connect to it and open one page with the domains we listen to enabled."""
        exe = self.executable or find_chromium()
        if not exe:
            raise BrowserError(f"chromium not found: install Debian's chromium or set {CHROMIUM_ENV}")
        self._tmp = Path(tempfile.mkdtemp(prefix="mmlesion-chromium-"))
        profile = self._tmp / "profile"
        width, height = self.window_size
        with open(self._tmp / "chromium.log", "wb") as log:
            self._proc = subprocess.Popen(
                [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        port, path = self._devtools_endpoint(profile / "DevToolsActivePort")
        self._connect(f"ws://127.0.0.1:{port}{path}")
        self._open_page()

    def close(self) -> None:
        """End the browser (politely, then by force) and remove its temporary profile; idempotent."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.send(json.dumps({"id": self._new_id(), "method": "Browser.close"}))
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self._proc is not None:
            _stop_process(self._proc)
            self._proc = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def pid(self) -> int | None:
        """Process id of the running browser (None when not started or closed)."""
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------------ pages

    def open(self, target: str | Path) -> PageLoad:
        """Navigate to a file path or URL and wait for its load event; returns what happened."""
        url = target if isinstance(target, str) and "://" in target else Path(target).resolve().as_uri()
        self._errors.clear()
        self._requests.clear()
        self._lifecycle.clear()
        result = self._call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        loader = result.get("loaderId", "")
        deadline = time.monotonic() + self.timeout
        while (loader, "load") not in self._lifecycle:
            self._dispatch(self._receive(deadline, f"loading {url}"))
        return PageLoad(url=url, title=self.evaluate("document.title"),
                        console_errors=self.console_errors, requests=list(self._requests))

    @property
    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries since the last :meth:`open`."""
        self._call("Runtime.evaluate", {"expression": "0"})  # CDP is ordered: earlier events arrive first
        return list(self._errors)

    @property
    def requests(self) -> list[str]:
        """URLs the page requested since the last :meth:`open` (data: and file: included)."""
        self._call("Runtime.evaluate", {"expression": "0"})
        return list(self._requests)

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page and return its JSON value (None if undefined)."""
        result = self._call("Runtime.evaluate",
                            {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            raise BrowserError(f"JavaScript error in {expression[:60]!r}: {text}")
        return result.get("result", {}).get("value")

    def images(self) -> list[dict]:
        """Every <img> with ``src`` (first 120 chars), ``complete``, ``naturalWidth``, ``naturalHeight``."""
        return self.evaluate(_IMAGES_JS) or []

    def broken_images(self) -> list[str]:
        """The ``src`` of every <img> that did not load (not complete, or ``naturalWidth == 0``)."""
        return [img["src"] for img in self.images() if not (img["complete"] and img["naturalWidth"] > 0)]

    def screenshot(self, path: str | Path, *, full_page: bool = True, max_height: int = 12000) -> Path:
        """Save a PNG of the viewport, or of the whole page (up to ``max_height`` CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self._call("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "scale": 1, "width": max(size["width"], 1),
                "height": min(max(size["height"], 1), max_height)})
        data = base64.b64decode(self._call("Page.captureScreenshot", params)["data"])
        with atomic_write(path, "wb") as fh:
            fh.write(data)
        return Path(path)

    # ------------------------------------------------------------------ protocol

    def _devtools_endpoint(self, port_file: Path) -> tuple[int, str]:
        """Wait for Chromium to write its debugging port and browser websocket path."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with code {self._proc.returncode}: {self._log_tail()}")
            lines = port_file.read_text().splitlines() if port_file.exists() else []
            if len(lines) >= 2 and lines[0].strip().isdigit() and _BROWSER_PATH.fullmatch(lines[1].strip()):
                return int(lines[0]), lines[1].strip()
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open a debugging port within {self.timeout:.0f} s: {self._log_tail()}")

    def _connect(self, url: str) -> None:
        """Open the browser-level websocket (no Origin header, so no --remote-allow-origins is needed)."""
        import websocket

        try:
            self._ws = websocket.create_connection(url, timeout=self.timeout, suppress_origin=True)
        except (OSError, websocket.WebSocketException) as exc:
            raise BrowserError(f"cannot connect to chromium at {url}: {exc}") from None

    def _open_page(self) -> None:
        """Create a page, attach to it (flat session) and enable the events we collect."""
        target = self._call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                   browser=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self._call(method)
        self._call("Page.setLifecycleEventsEnabled", {"enabled": True})
        width, height = self.window_size
        self._call("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _call(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        """Send one command (to the page session unless ``browser``) and wait for its answer."""
        if self._ws is None:
            raise BrowserError("chromium is not running (use HeadlessChromium as a context manager)")
        message: dict[str, Any] = {"id": self._new_id(), "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self._session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})
            self._dispatch(reply)

    def _receive(self, deadline: float, doing: str) -> dict:
        """The next protocol message, or BrowserError once ``deadline`` has passed."""
        import websocket

        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrowserError(f"chromium timed out after {self.timeout:.0f} s while {doing}")
        self._ws.settimeout(remaining)
        try:
            return json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            raise BrowserError(f"chromium timed out after {self.timeout:.0f} s while {doing}") from None
        except (OSError, websocket.WebSocketException) as exc:
            raise BrowserError(f"lost the connection to chromium while {doing}: {exc}") from None

    def _dispatch(self, message: dict) -> None:
        """Route an event to its collector; events we do not collect are dropped."""
        handler = self._handlers.get(message.get("method", ""))
        if handler is not None:
            handler(message.get("params", {}))

    # ------------------------------------------------------------------ event collectors

    def _on_console(self, params: dict) -> None:
        if params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            self._errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in args))

    def _on_exception(self, params: dict) -> None:
        details = params.get("exceptionDetails", {})
        text = details.get("exception", {}).get("description") or details.get("text", "")
        self._errors.append(f"exception: {text}")

    def _on_log(self, params: dict) -> None:
        entry = params.get("entry", {})
        if entry.get("level") == "error":
            self._errors.append(f"log: {entry.get('text', '')} {entry.get('url', '')}".strip())

    def _on_request(self, params: dict) -> None:
        self._requests.append(params.get("request", {}).get("url", ""))

    def _on_lifecycle(self, params: dict) -> None:
        self._lifecycle.add((params.get("loaderId", ""), params.get("name", "")))

    def _on_detached(self, params: dict) -> None:
        raise BrowserError(f"the page crashed or was detached: {params.get('reason', params)}")

    def _log_tail(self, n: int = 600) -> str:
        """The end of Chromium's own output, for error messages."""
        log = self._tmp / "chromium.log" if self._tmp else None
        return log.read_text(errors="replace")[-n:].strip() if log and log.exists() else ""


def _stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Wait briefly for the browser to exit, then terminate, then kill it and its process group."""
    for stop in (None, proc.terminate, proc.kill):
        if stop is not None:
            with contextlib.suppress(ProcessLookupError):
                stop()
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Chromium was started in its own session: end helpers (renderers, zygote) it may have left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError, AttributeError):
        os.killpg(proc.pid, signal.SIGKILL)
