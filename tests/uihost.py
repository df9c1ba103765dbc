"""ComfyUI's real web frontend in headless Chromium (Debian's browser, driven by Playwright)."""

from __future__ import annotations

import contextlib
import re
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


# How a request to the internet fails on a machine without it (the frontend asks api.comfy.org
# about node packs); every other console error, and any HTTP error status, is a problem.
OFFLINE_ERRORS = ("ERR_NAME_NOT_RESOLVED", "ERR_INTERNET_DISCONNECTED", "ERR_NETWORK_ACCESS_DENIED")
PROBED = re.compile(r"/(api/userdata[/?]|user\.css$|favicon\.ico$)")
FIT_VIEW_JS = "async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }"


@contextlib.contextmanager
def browser_page(url: str):
    """A page with the ComfyUI app loaded; ``page.gpen_log`` collects console errors, HTTP error
    responses, failed requests and dialogs (``page.gpen_offline``: requests to the internet)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        log: list[str] = []
        offline: list[str] = []  # requests to the internet, which test machines cannot reach

        def unreachable(text: str, where: str) -> bool:
            return not where.startswith(url) and any(f"net::{e}" in text for e in OFFLINE_ERRORS)

        def console(message) -> None:
            if message.type == "error":
                where = message.location.get("url", "")
                if "status of 404" in message.text and PROBED.search(where):
                    return
                text = f"console.error: {message.text} ({where})"
                (offline if unreachable(message.text, where) else log).append(text)

        def failed(request) -> None:
            if "ERR_ABORTED" in (request.failure or ""):  # the page dropped it (e.g. a closed dialog)
                return
            text = f"request failed ({request.failure}): {request.url}"
            (offline if unreachable(request.failure or "", request.url) else log).append(text)

        def response(answer) -> None:
            # The frontend probes the user's optional files (user.css, settings, saved workflow
            # folders) and takes a 404 as "none yet"; any other error status is a problem.
            if answer.status >= 400 and not (answer.status == 404 and PROBED.search(answer.url)):
                log.append(f"http {answer.status}: {answer.url}")

        page.on("console", console)
        page.on("pageerror", lambda e: log.append(f"pageerror: {e}"))
        page.on("dialog", lambda d: (log.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("response", response)
        page.on("requestfailed", failed)
        # A returning user: no first-start templates dialog over the graph.
        page.request.post(f"{url}/settings/Comfy.TutorialCompleted", data="true")
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90_000)
        page.wait_for_timeout(2000)
        page.gpen_log = log
        page.gpen_offline = offline
        try:
            yield page
        finally:
            browser.close()
