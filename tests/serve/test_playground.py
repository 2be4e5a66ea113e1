"""The playground page in a real headless Chromium: type a prompt, click Generate, watch the text stream in."""

from __future__ import annotations

import shutil
import time

import pytest


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium + chromedriver not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_playground_streams_text(live, client):
    browser = _chromium()  # skips, with the reason, where Chromium, chromedriver or selenium is missing
    from selenium.webdriver.common.by import By

    try:
        expected = client.completions.create(model="tiny", prompt="the cat", max_tokens=60,
                                             temperature=0).choices[0].text
        browser.get(live.url + "/")
        assert "gpt2kit playground" in browser.title
        browser.find_element(By.ID, "prompt").send_keys("the cat")
        for field, value in (("max_tokens", "60"), ("temperature", "0")):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        # count the page's text updates: streamed text arrives as many small changes, not one
        browser.execute_script(
            "window.__updates = 0; new MutationObserver((ms) => { for (const m of ms)"
            " if (m.target.id === 'completion') window.__updates++; })"
            ".observe(document.getElementById('output'), {subtree: true, childList: true, characterData: true});")
        browser.find_element(By.ID, "generate").click()
        deadline = time.monotonic() + 30
        while "done" not in browser.find_element(By.ID, "status").text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert browser.find_element(By.ID, "status").text.startswith("done"), browser.find_element(By.ID, "status").text
        got = browser.execute_script("return document.getElementById('completion').textContent")
        assert got == expected
        updates = browser.execute_script("return window.__updates")
        assert updates >= 2
    finally:
        browser.quit()
