"""The web chat page of run_server.py (the built-in demo model) in a real headless Chromium, driven by Playwright:
upload the demo image, ask the demo question, see the demo model's answer stream in; a follow-up question
carries the history; Clear empties the conversation. The screenshot is kept in the test's output folder.

Chromium comes from the OS packages (/usr/bin/chromium; .ci/run installs it); no browser is downloaded.
"""
import os

import pytest

from test_server import served

CHROMIUM = "/usr/bin/chromium"
# the demo model's answer to its own question about its own image (README, run_infer.py with no arguments)
DEMO_QUESTION = "描述这张图片。"
DEMO_ANSWER = "一只虎斑猫正看着镜头，它有一双绿色的眼睛。"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_upload_ask_and_see_the_answer(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install the OS package (apt-get install chromium), as .ci/run does")
    sync_api = pytest.importorskip("playwright.sync_api")
    from visual_mllm.paths import DEMO_IMAGE

    with served(tmp_path, "--quick_start") as (url, _), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent === 'visualglm_tiny'")
            page.set_input_files("#image", DEMO_IMAGE)
            page.wait_for_selector("#preview:not([hidden])")
            page.fill("#question", DEMO_QUESTION)
            page.click("#send")
            page.wait_for_selector(".assistant[data-done='true']", timeout=120_000)
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            assert page.inner_text(".user") == f"You: {DEMO_QUESTION}"
            assert page.inner_text(".assistant") == f"Model: {DEMO_ANSWER}"
            assert page.locator(".error").count() == 0

            page.fill("#question", "它是什么颜色的？")  # a second turn: sent with the first as history
            page.click("#send")
            page.wait_for_function("document.querySelectorAll(\".assistant[data-done='true']\").length === 2",
                                   timeout=120_000)
            assert page.locator(".error").count() == 0 and page.locator(".user").count() == 2
            page.click("#clear")
            assert page.locator(".turn").count() == 0
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 0
