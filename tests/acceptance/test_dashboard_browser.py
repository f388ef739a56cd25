"""The dashboard in a real browser: Debian's chromium, headless, driven by Selenium through the
system chromedriver (nothing is downloaded), against `taskomatic serve` as a user runs it.

A person signs in with a token, watches a group submitted over the API reach `complete`
without reloading the page, opens a task's timeline, sees a failing task's error, signs out.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from acceptance.cli import Cli
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 60.0
"""Longest the browser waits for the page to show something (seconds): a bound for a loaded
machine, not a speed check (it takes a second or two)."""


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless chromium from the system packages (bin/setup --test installs them)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: run bin/setup --test"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _api(base: str, token: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    req.add_header("Authorization", f"Bearer {token}")
    if data:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _until(driver: WebDriver, what: str, check: Any) -> Any:
    return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1).until(
        lambda d: check(d), message=f"the page never showed {what}"
    )


def _text(driver: WebDriver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def test_sign_in_watch_a_group_complete_live_and_see_a_failure(
    sqlite_cli: Cli, browser: WebDriver
) -> None:
    cli = sqlite_cli
    token = cli.ok("tokens", "create", "--name", "ops", "--role", "operator").stdout.strip()
    with cli.background(
        "serve", "--bind", "127.0.0.1:0", "--workers", "2", "--no-inventory",
        "--log-format", "json",
    ) as server:  # fmt: skip
        base = server.first_line().split()[1]

        # Unsigned, the dashboard sends the browser to the sign-in form; a wrong token stays.
        browser.get(base + "/")
        _until(browser, "the sign-in form", lambda d: d.find_elements(By.ID, "token"))
        browser.find_element(By.ID, "token").send_keys("tkm_0123456789ab_wrong")
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        _until(browser, "the refusal", lambda d: "unknown or revoked" in _text(d, "#login-error"))
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        _until(browser, "the overview", lambda d: d.current_url.endswith("/ui/"))
        assert token not in browser.current_url
        cookie = browser.get_cookie("taskomatic_session")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        _until(browser, "the live counts", lambda d: _text(d, "#count-new").isdigit())

        # A group submitted over the API appears and reaches complete, with no reload.
        browser.execute_script("window.notReloaded = true;")
        gid = str(uuid.uuid4())
        group = _api(
            base,
            token,
            "/v1/groups",
            {
                "id": gid,
                "name": "watched",
                "tasks": [
                    {"name": "first", "action": "sleep", "params": {"seconds": 1.0}},
                    {"name": "second", "action": "noop", "after": ["first"]},
                ],
            },
        )
        first = group["tasks"][0]["id"]
        _until(browser, "the group", lambda d: "watched" in _text(d, "#groups"))
        _until(
            browser,
            "the group complete",
            lambda d: (
                "watched\ncomplete" in _text(d, "#groups")
                or "watched complete" in _text(d, "#groups")
            ),
        )
        assert browser.execute_script("return window.notReloaded === true;")
        assert int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-updates")) > 1
        assert int(_text(browser, "#count-complete")) >= 2

        # The group page draws the DAG with each task's state; a task page shows its timeline.
        browser.find_element(By.LINK_TEXT, "watched").click()
        _until(browser, "the DAG", lambda d: d.find_elements(By.CSS_SELECTOR, "#dag .node"))
        nodes = browser.find_elements(By.CSS_SELECTOR, "#dag g.node")
        assert len(nodes) == 2
        assert {n.get_attribute("class") for n in nodes} == {"node state-complete"}
        assert len(browser.find_elements(By.CSS_SELECTOR, "#dag line")) == 1  # first -> second
        browser.get(f"{base}/ui/tasks/{first}")
        _until(browser, "the timeline", lambda d: "complete" in _text(d, "#timeline"))
        steps = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li")]
        assert [s.split(" → ")[1].split()[0] for s in steps] == ["new", "running", "complete"]

        # A failing task: its error shows on the overview, live, and on its page.
        browser.get(base + "/ui/")
        _until(browser, "the live counts", lambda d: _text(d, "#count-new").isdigit())
        failing = _api(
            base,
            token,
            "/v1/tasks",
            {"action": "fail", "params": {"message": "disk on fire"}, "max_attempts": 1},
        )
        _until(browser, "the failure", lambda d: "disk on fire" in _text(d, "#failures"))
        browser.find_element(By.CSS_SELECTOR, f'#failures a[href="/ui/tasks/{failing["id"]}"]')
        browser.get(f"{base}/ui/tasks/{failing['id']}")
        _until(browser, "the error", lambda d: "disk on fire" in _text(d, "#error"))
        assert _text(browser, "#state") == "failed"

        # Sign out: the session is over, the dashboard asks for a token again.
        browser.find_element(By.ID, "sign-out").click()
        _until(browser, "the sign-in form", lambda d: d.find_elements(By.ID, "token"))
        browser.get(base + "/ui/")
        _until(browser, "the sign-in form", lambda d: d.current_url.endswith("/ui/login"))

    logged = server.stop()
    lines = [json.loads(line) for line in logged.stderr.splitlines() if line.startswith("{")]
    assert lines, logged.stderr
    assert any(line.get("task") == failing["id"] for line in lines)
    assert token not in logged.stderr and token.split("_")[-1] not in logged.stderr
