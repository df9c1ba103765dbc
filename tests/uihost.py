"""ComfyUI's real web frontend in headless Chromium (Debian's browser, driven by Playwright)."""

from __future__ import annotations

import contextlib
import shutil

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("Chromium is not installed: apt-get install -y chromium (scripts/setup.sh --ui does it).")
    return path


TOASTS_JS = "() => [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText)"
CLEAR_TOASTS_JS = "() => document.querySelectorAll('.p-toast-message').forEach(t => t.remove())"


FIT_VIEW_JS = "async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }"


@contextlib.contextmanager
def browser_page(url: str):
    """A page with the ComfyUI app loaded; ``page.gpen_log`` collects console errors and dialogs."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 2560, "height": 1280})
        log: list[str] = []
        page.on("console", lambda m: log.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: log.append(f"pageerror: {e}"))
        page.on("dialog", lambda d: (log.append(f"dialog: {d.message}"), d.dismiss()))
        # A returning user: no first-start templates dialog over the graph.
        page.request.post(f"{url}/settings/Comfy.TutorialCompleted", data="true")
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90_000)
        page.wait_for_timeout(2000)
        page.gpen_log = log
        try:
            yield page
        finally:
            browser.close()
