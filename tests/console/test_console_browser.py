"""The web console end to end (issue #16): a real region (with a 3-node store colony), headless
Chromium driven by Selenium. Log in, click through every page (a screenshot of each kept as an
artefact, and an axe-core accessibility check of each: WCAG 2 A/AA rules, labels and contrast
among them), N invokes show as N on the function's page with the handler's log line, a frozen
agent shows as failed on the map, a request without the operator credential is refused.

One region and one browser for the module (tests/integration/conftest.py ``running_region``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region

from .conftest import artefacts_dir, free_port

pytestmark = pytest.mark.integration

WAIT_S = 60  # generous: a busy machine
AXE_OPTIONS = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa"]}}


@pytest.fixture(scope="module")
def colony(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    """A real 3-node store colony on loopback: (colony file, node id -> process)."""
    from cellcloud.store.colony import Colony, spawn_node, wait_ready

    d = tmp_path_factory.mktemp("colony")
    col = Colony.local(3, 0)
    for spec in col.nodes.values():
        spec.port = free_port()
    path = str(d / "colony.json")
    col.save(path)
    procs = {}
    try:
        for n in col.node_ids():
            procs[n] = spawn_node(path, n, str(d / n))
            wait_ready(procs[n])
        yield path, procs
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory,
           colony: tuple[str, dict[str, Any]]) -> Iterator[Region]:
    with running_region(tmp_path_factory, "console", "--agents-per-cell", "2",
                        "--store-colony", colony[0]) as r:
        yield r


def _token(region: Region) -> str:
    with open(str(region.region_json()["operator_token_file"])) as f:
        return str(json.load(f)["token"])


def _wait(driver: Any, what: str, cond: Callable[[Any], Any]) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, ignored_exceptions=(
            StaleElementReferenceException,)).until(cond)
    except TimeoutException:
        _shot(driver, "timeout-" + what.replace(" ", "-")[:40])
        raise AssertionError(f"not seen within {WAIT_S}s: {what}") from None


def _text_of(element_id: str) -> Callable[[Any], str]:
    from selenium.common.exceptions import NoSuchElementException, WebDriverException
    from selenium.webdriver.common.by import By

    def read(driver: Any) -> str:
        try:
            return str(driver.find_element(By.ID, element_id).text)
        except NoSuchElementException:
            return ""
        except WebDriverException as e:
            # chromedriver's race with a page replacing its DOM (after a form's submit): the
            # node it found was detached before it read it. Read again on the next poll.
            if "does not belong to the document" in str(e.msg):
                return ""
            raise
    return read


def _shot(driver: Any, name: str) -> str:
    path = os.path.join(artefacts_dir(), f"{name}.png")
    driver.save_screenshot(path)
    return path


def _axe(driver: Any, page: str) -> None:
    """axe-core (shipped in axe-selenium-python, injected from the file: no network) over the
    page: no WCAG 2 A/AA violation (labels, alt text, contrast, names, …)."""
    from axe_selenium_python import Axe

    axe = Axe(driver)
    axe.inject()
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"axe.run(document, {json.dumps(AXE_OPTIONS)}).then(done, e => done({{error: String(e)}}));")
    assert "error" not in result, result
    assert result["passes"], "axe ran no rule: the check would pass anything"
    with open(os.path.join(artefacts_dir(), f"axe-{page}.json"), "w") as f:
        json.dump(result["violations"], f, indent=1)
    assert result["violations"] == [], axe.report(result["violations"])


def _rate(caption: str) -> float:
    """The latest value a chart's caption names ("Invocations per second: invocations 0.50
    /s"), 0 without one."""
    m = re.search(r": \w+ ([0-9.]+) ", caption)
    return float(m.group(1)) if m else 0.0


def _login(driver: Any, region: Region) -> None:
    from selenium.webdriver.common.by import By

    driver.get(region.endpoint + "/console/login")
    driver.delete_all_cookies()  # a fresh session each test
    driver.get(region.endpoint + "/console/")
    _wait(driver, "login form", lambda d: d.current_url.endswith("/console/login"))
    driver.find_element(By.ID, "token").send_keys(_token(region))
    driver.find_element(By.ID, "login").click()
    _wait(driver, "map after login", lambda d: _text_of("page-title")(d) == "Region map")


def test_refused_without_the_operator_credential(region: Region, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
        req = urllib.request.Request(region.endpoint + path, headers=headers or {})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a: Any, **k: Any) -> None:
                return None
        try:
            with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    for path in ("/console/api/region", "/console/api/metrics", "/console/api/store"):
        assert get(path)[0] == 403, path
        assert get(path, {"authorization": "Bearer not-the-token"})[0] == 403, path
        assert get(path, {"cookie": "cellcloud_console=" + "0" * 64})[0] == 403, path
        assert get(path, {"authorization": f"Bearer {_token(region)}"})[0] == 200, path
    status, headers = get("/console/")
    assert status == 303 and headers["location"] == "/console/login"
    assert get("/console/console.js")[0] == 303  # only the login page and its CSS are public
    assert get("/console/login")[0] == 200

    browser.get(region.endpoint + "/console/login")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "login").click()
    _wait(browser, "login error", lambda d: "not the operator token" in _text_of(
        "login-error")(d))
    _shot(browser, "login-refused")
    _axe(browser, "login")
    assert not browser.get_cookies()


def test_click_through_every_page(region: Region, browser: Any) -> None:
    """The default run's smoke: every page (screenshot + axe), the cookie's flags, the
    function page after N invokes (N and the handler's log line), the charts' rates, the
    function's shard on the map."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    n = 3
    name = f"con-{uuid.uuid4().hex[:6]}"
    # markup in a log line must show as text (the page never parses data as HTML)
    line = f"console-line-{uuid.uuid4().hex[:8]}<i>x</i>"
    code = f"def handler(event, context):\n    print('{line}', event['i'])\n    return event\n"
    region.client.create_function(name, make_zip({"app.py": code}), "app.handler")
    for i in range(n):
        assert region.client.invoke(name, {"i": i}).status == 200
    _login(browser, region)
    cookie = next(c for c in browser.get_cookies() if c["name"] == "cellcloud_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["value"] != _token(region)  # derived from the token, never the token
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: not in JS

    pages = [("nav-map", "Region map", "agents"),
             ("nav-functions", "Functions", f"fn-link-{name}"),
             ("fn-link-" + name, f"Function {name}", "fn-logs"),
             ("nav-metrics", "Metrics", "chart-rate"),
             ("nav-queues", "Queues", "sqs-queues"),
             ("nav-store", "Configuration store", "store-nodes")]
    for link, title, marker in pages:
        browser.find_element(By.ID, link).click()
        _wait(browser, title, lambda d, t=title: _text_of("page-title")(d) == t)
        _wait(browser, marker, lambda d, m=marker: d.find_elements(By.ID, m))
        page = "function" if link.startswith("fn-link-") else link.removeprefix("nav-")
        if page == "function":
            # After N invokes: N on the page, and each invocation's line from the handler.
            _wait(browser, f"{n} invocations",
                  lambda d: _text_of("fn-invocations")(d) == str(n))
            logs = _wait(browser, "log lines", lambda d: _text_of("fn-logs")(d).count(line)
                         == n and _text_of("fn-logs")(d))
            assert all(f"{line} {i}" in logs for i in range(n))
            assert not browser.find_elements(By.CSS_SELECTOR, "#fn-logs i")
            assert "cell-1" in _text_of("fn-shard")(browser)
        if page == "metrics":
            # Counters become rates between two samples: invoke while the page samples.
            for i in range(5):
                region.client.invoke(name, {"i": i})
            _wait(browser, "an invocation rate", lambda d: _rate(_text_of(
                "chart-rate-latest")(d)) > 0)
            _wait(browser, "a latency", lambda d: _rate(_text_of(
                "chart-latency-latest")(d)) > 0)
        _shot(browser, page)
        _axe(browser, page)

    # The map draws the function's shard: pick it, its agents are outlined and named.
    browser.find_element(By.ID, "nav-map").click()
    key = f"{region.doc['account_id']}/{name}"
    _wait(browser, "shard picker", lambda d: any(
        o.get_attribute("value") == key
        for o in d.find_elements(By.CSS_SELECTOR, "#shard-pick option")))
    Select(browser.find_element(By.ID, "shard-pick")).select_by_value(key)
    text = _wait(browser, "shard text",
                 lambda d: _text_of("shard-text")(d).startswith(f"Shard of {key}: ")
                 and _text_of("shard-text")(d))
    drawn = browser.find_elements(By.CSS_SELECTOR, "#region-map g.in-shard")
    assert sorted(g.get_attribute("data-agent") for g in drawn) == sorted(
        text.split(": ", 1)[1].split(", "))
    _shot(browser, "map-shard")


@pytest.mark.slow  # the default run keeps the smoke above (its budget: ~60 s for the module)
def test_queues_page_shows_queues_their_dead_letter_queues_and_the_async_backlog(
        region: Region, browser: Any) -> None:
    import boto3
    from selenium.webdriver.common.by import By

    kw: dict[str, Any] = {
        "endpoint_url": region.endpoint, "region_name": str(region.doc["region"]),
        "aws_access_key_id": str(region.doc["access_key_id"]),
        "aws_secret_access_key": str(region.doc["secret_access_key"])}
    sqs = boto3.client("sqs", **kw)
    tag = uuid.uuid4().hex[:6]
    dlq = sqs.create_queue(QueueName=f"dlq-{tag}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    src = sqs.create_queue(QueueName=f"in-{tag}", Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"})})["QueueUrl"]
    for i in range(4):
        sqs.send_message(QueueUrl=src, MessageBody=str(i))
    name = f"slow-{tag}"
    slow = "import time\ndef handler(event, context):\n    time.sleep(8)\n    return event\n"
    region.client.create_function(name, make_zip({"app.py": slow}), "app.handler",
                                  timeout_s=20)
    lam = boto3.client("lambda", **kw)
    lam.update_function_configuration(FunctionName=name, DeadLetterConfig={"TargetArn": dlq_arn})
    assert lam.invoke(FunctionName=name, InvocationType="Event",
                      Payload=b"{}")["StatusCode"] == 202

    _login(browser, region)
    browser.find_element(By.ID, "nav-queues").click()
    _wait(browser, "the source queue", lambda d: f"in-{tag}" in _text_of("sqs-queues")(d))
    rows = {r.find_elements(By.TAG_NAME, "td")[1].text: [c.text for c in r.find_elements(
        By.TAG_NAME, "td")] for r in browser.find_elements(By.CSS_SELECTOR,
                                                           "#sqs-queues tbody tr")}
    assert rows[f"in-{tag}"][2] == "4" and rows[f"in-{tag}"][5] == dlq_arn
    assert rows[f"dlq-{tag}"][6] == f"function {name}, in-{tag}"
    assert dlq_arn in _text_of("function-dlqs")(browser)
    # The async event waits or runs for 8 s: the backlog shows it meanwhile.
    _wait(browser, "the async backlog", lambda d: name in _text_of("async-backlog")(d))
    _shot(browser, "queues-dlq")


@pytest.mark.slow
def test_store_page_shows_a_cell_and_a_dead_node(region: Region, browser: Any,
                                                 colony: tuple[str, dict[str, Any]]) -> None:
    from selenium.webdriver.common.by import By

    path, procs = colony
    cell = f"console-{uuid.uuid4().hex[:6]}"
    subprocess.run([sys.executable, "-m", "cellcloud", "store", "create-cell", "--colony", path,
                    cell, "--replicas", "3"], check=True, timeout=60, capture_output=True)
    _login(browser, region)
    browser.find_element(By.ID, "nav-store").click()
    _wait(browser, "store nodes", lambda d: d.find_elements(By.ID, "store-node-n3"))
    assert {e.text for e in browser.find_elements(By.CSS_SELECTOR, "[id^=store-node-]")} \
        == {"up"}
    browser.find_element(By.ID, "store-cell-name").send_keys(cell)
    browser.find_element(By.ID, "store-cell-show").click()
    rows = _wait(browser, "the cell's replicas", lambda d: d.find_elements(
        By.CSS_SELECTOR, "#store-replicas tbody tr"))
    assert len(rows) == 3 and all(" up " in f" {r.text} " for r in rows)
    _shot(browser, "store-cell")
    procs["n3"].kill()
    procs["n3"].wait()
    _wait(browser, "n3 down", lambda d: _text_of("store-node-n3")(d) == "down")
    _wait(browser, "n3's replica unreachable", lambda d: "unreachable" in _text_of(
        "store-replicas")(d))
    _shot(browser, "store-node-down")


@pytest.mark.slow  # ~20 s: the frozen agent must miss a status call (agent_call_timeout_ms)
def test_a_killed_agent_shows_failed_on_the_map(region: Region, browser: Any) -> None:
    """The supervisor restarts a SIGKILLed agent within a second, so the agent is frozen
    (SIGSTOP: alive, answering nothing, as a hung host) until the map shows it failed."""
    from selenium.webdriver.common.by import By

    comps = region.region_json()["components"]
    assert isinstance(comps, dict)
    agent = "cell-1-agent-1"
    pid = int(comps[agent]["pid"])
    _login(browser, region)
    _wait(browser, "agent up", lambda d: _text_of(f"agent-state-{agent}")(d) == "up")
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait(browser, "agent failed",
              lambda d: _text_of(f"agent-state-{agent}")(d) == "failed")
        drawn = browser.find_element(By.CSS_SELECTOR, f'#region-map g[data-agent="{agent}"]')
        assert drawn.get_attribute("data-state") == "failed"
        assert "FAILED" in drawn.text
        _shot(browser, "map-agent-failed")
        # The region's status (cellcloud status --json) names the agent, not the whole cell:
        # the router waits longer for a cell than the cell waits for its agents.
        cell = region.client.status()["cells"]["cell-1"]
        assert "error" not in cell, cell.get("error")
        assert "error" in cell["agents"][agent]
    finally:
        os.kill(pid, signal.SIGCONT)
    _wait(browser, "agent back", lambda d: _text_of(f"agent-state-{agent}")(d) == "up")


def test_axe_fails_a_page_with_an_unlabelled_input_and_low_contrast(browser: Any) -> None:
    # Negative control: the accessibility check can fail.
    page = ("<!doctype html><html lang='en'><head><title>bad</title></head><body><main>"
            "<h1>bad</h1><input type='text'><p style='color:#bbb;background:#fff'>faint</p>"
            "</main></body></html>")
    browser.get("data:text/html;charset=utf-8," + urllib.request.quote(page))
    with pytest.raises(AssertionError) as e:
        _axe(browser, "negative-control")
    assert "label" in str(e.value) and "color-contrast" in str(e.value)
