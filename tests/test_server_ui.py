"""The demo page in headless Chromium: a painted mask or a dragged box (SAM) gives a streamed caption.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages ended by NUL on fds 3 and 4), so no driver or websocket package is needed. Skipped
where no chromium binary is installed (Debian: apt-get install chromium). Set
DAM_UI_SCREENSHOT=path.png to keep the screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from dam import DescribeAnything  # noqa: E402
from dam.server import BackgroundServer, ServerSettings, create_app  # noqa: E402
from tests.factories import box_mask, tiny_dam, tiny_tokenizer  # noqa: E402

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "chromium-headless-shell") if shutil.which(name)), None)


class HeadlessChromium:
    """A headless Chromium with one page, driven by DevTools commands over a pipe."""

    def __init__(self, binary: str, width: int = 1000, height: int = 820) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def wire_pipes() -> None:  # in the child: fd 3 = commands in, fd 4 = replies out
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=wire_pipes, close_fds=False,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def command(self, method: str, timeout: float = 30.0, **params: Any) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([self._from_browser], [], [], max(remaining, 0))
                if not ready:
                    raise TimeoutError(f"chromium did not answer {method}")
                data = os.read(self._from_browser, 1 << 20)
                if not data:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += data
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.command("Target.createTarget", url=url)["targetId"]
        self.session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str) -> Any:
        return self.command("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.command("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


class FakeSam:
    """Stands in for segment-anything: a box becomes the mask of exactly that box."""

    def mask_from_box(self, image, box):
        return box_mask(image.shape[0], image.shape[1], *[int(v) for v in box])

    def mask_from_points(self, image, points, labels=None):
        x, y = (int(v) for v in points[0])
        return box_mask(image.shape[0], image.shape[1], x - 5, y - 5, x + 5, y + 5)


def wait_for_state(browser: HeadlessChromium, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while browser.evaluate("document.body && document.body.dataset.state") not in ("done", "error"):
        assert time.monotonic() < deadline, "the caption did not arrive"
        time.sleep(0.2)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_demo_page_box_goes_through_sam(tmp_path):
    describer = DescribeAnything(tiny_dam(seed=3), tiny_tokenizer(), sam=FakeSam())
    with BackgroundServer(create_app(describer, ServerSettings(ui=True))) as server:
        browser = HeadlessChromium(CHROMIUM)
        try:
            browser.open(server.url + "/")
            deadline = time.monotonic() + 20
            while "with SAM" not in (browser.evaluate("document.getElementById('status').textContent") or ""):
                assert time.monotonic() < deadline, "the page did not read /health"
                time.sleep(0.1)
            assert browser.evaluate("document.querySelector('input[value=box]').disabled") is False
            browser.evaluate(
                "loadExample(); document.querySelector('input[value=box]').checked = true;"
                "(() => { const r = overlay.getBoundingClientRect();"
                "  const at = (t, x, y) => overlay.dispatchEvent(new PointerEvent(t, {clientX: r.left + x, clientY: r.top + y, pointerId: 1, bubbles: true}));"
                "  at('pointerdown', 170, 60); at('pointermove', 200, 100); at('pointerup', 240, 130); })()"
            )
            deadline = time.monotonic() + 20
            while not (browser.evaluate("document.getElementById('status').textContent") or "").startswith("mask from SAM"):
                assert time.monotonic() < deadline, "no mask came back from /v1/segment"
                time.sleep(0.1)
            status = browser.evaluate("document.getElementById('status').textContent")
            browser.evaluate("describe()")
            wait_for_state(browser)
            caption = browser.evaluate("document.getElementById('caption').textContent")
        finally:
            browser.close()
    assert status == f"mask from SAM: {70 * 70} pixels"
    assert len(caption.split()) >= 3, caption


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_demo_page_paints_a_mask_and_streams_a_caption(tmp_path):
    describer = DescribeAnything(tiny_dam(seed=3), tiny_tokenizer())
    with BackgroundServer(create_app(describer, ServerSettings(ui=True))) as server:
        browser = HeadlessChromium(CHROMIUM)
        try:
            browser.open(server.url + "/?example=1&describe=1")
            wait_for_state(browser)
            caption = browser.evaluate("document.getElementById('caption').textContent")
            status = browser.evaluate("document.getElementById('status').textContent")
            painted = browser.evaluate("maskDataUrl() !== null")
            png = browser.screenshot()
        finally:
            browser.close()
    assert status.startswith("done"), status
    assert painted and len(caption.split()) >= 3, caption
    screenshot = Path(os.environ.get("DAM_UI_SCREENSHOT") or tmp_path / "demo.png")
    screenshot.write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    magenta_tint = (pixels[..., 0] > 180) & (pixels[..., 2] - pixels[..., 1] > 60)
    assert magenta_tint.sum() > 2000, "the painted mask should show (magenta) over the example's red circle"
    assert pixels.std() > 20  # a rendered page, not a blank one
