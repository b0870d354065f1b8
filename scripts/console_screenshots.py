"""Make the screenshots of docs/observability.md: a region with a store colony, a little traffic
(sync and async invokes, an erroring function, an SQS queue with a dead-letter queue), and
headless chromium on each console page. Run as root from the repository root:

    PYTHONPATH=src .venv/bin/python scripts/console_screenshots.py docs/img
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.getcwd())

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from tests.conftest import make_zip  # noqa: E402
from tests.console.conftest import free_port  # noqa: E402

from cellcloud import sdk  # noqa: E402
from cellcloud.store.colony import Colony, spawn_node, wait_ready  # noqa: E402

OK = "import time\ndef handler(event, context):\n    print('order', event.get('i'))\n" \
     "    time.sleep(0.05)\n    return event\n"
FLAKY = "def handler(event, context):\n    if event.get('i', 0) % 3 == 0:\n" \
        "        raise ValueError('bad order')\n    return event\n"


def shot(d: webdriver.Chrome, out: str, name: str) -> None:
    """The whole page (up to 1,500 px high), not only the window."""
    height = min(1500, int(d.execute_script("return document.documentElement.scrollHeight")))
    d.set_window_size(1100, max(820, height + 90))  # + the browser's own chrome
    d.save_screenshot(os.path.join(out, name))
    d.set_window_size(1100, 820)


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="cellcloud-shots-")
    col = Colony.local(3, 0)
    for spec in col.nodes.values():
        spec.port = free_port()
    colony = os.path.join(work, "colony.json")
    col.save(colony)
    nodes = [spawn_node(colony, n, os.path.join(work, n)) for n in col.node_ids()]
    for p in nodes:
        wait_ready(p)
    state = os.path.join(work, "region")
    subprocess.run([sys.executable, "-m", "cellcloud", "up", "--detach", "--port", "0",
                    "--state-dir", state, "--store-colony", colony, "--agents-per-cell", "4",
                    *sys.argv[2:]],
                   check=True)
    stop = threading.Event()
    try:
        doc = json.load(open(os.path.join(state, "region.json")))
        token = json.load(open(doc["operator_token_file"]))["token"]
        c = sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60, operator_token=token)
        c.create_function("orders", make_zip({"app.py": OK}), "app.handler")
        c.create_function("payments", make_zip({"app.py": FLAKY}), "app.handler")
        import boto3

        kw = {"endpoint_url": doc["endpoint"], "region_name": doc["region"],
              "aws_access_key_id": doc["access_key_id"],
              "aws_secret_access_key": doc["secret_access_key"]}
        sqs = boto3.client("sqs", **kw)
        dlq = sqs.create_queue(QueueName="orders-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        work_q = sqs.create_queue(QueueName="orders-in", Attributes={"RedrivePolicy": json.dumps(
            {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"})})["QueueUrl"]
        for i in range(7):
            sqs.send_message(QueueUrl=work_q, MessageBody=json.dumps({"i": i}))
        sqs.send_message(QueueUrl=dlq, MessageBody="{}")
        lam = boto3.client("lambda", **kw)
        lam.update_function_configuration(FunctionName="payments",
                                          DeadLetterConfig={"TargetArn": dlq_arn})
        subprocess.run([sys.executable, "-m", "cellcloud", "store", "create-cell", "--colony",
                        colony, "cfg-demo", "--replicas", "3"], check=True, capture_output=True)

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                c.invoke("orders", {"i": i})
                c.invoke("payments", {"i": i})
                i += 1
                time.sleep(0.1)
        threading.Thread(target=traffic, daemon=True).start()

        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                  "--window-size=1100,820", "--hide-scrollbars"):
            opts.add_argument(a)
        d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        wait = WebDriverWait(d, 60)
        try:
            d.get(doc["endpoint"] + "/console/login")
            d.find_element(By.ID, "token").send_keys(token)
            d.find_element(By.ID, "login").click()
            wait.until(lambda d: d.find_elements(By.ID, "agents"))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#shard-pick option")) > 2)
            Select(d.find_element(By.ID, "shard-pick")).select_by_visible_text(
                f"{doc['account_id']}/orders")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "g.in-shard"))
            shot(d, out, "console-map.png")
            d.find_element(By.ID, "nav-metrics").click()
            time.sleep(30)  # the charts fill as the page samples: a picture, not a test
            shot(d, out, "console-metrics.png")
            d.find_element(By.ID, "nav-functions").click()
            wait.until(lambda d: d.find_elements(By.ID, "fn-link-orders"))
            shot(d, out, "console-functions.png")
            d.find_element(By.ID, "fn-link-orders").click()
            wait.until(lambda d: d.find_elements(By.ID, "fn-logs"))
            shot(d, out, "console-function.png")
            d.find_element(By.ID, "nav-queues").click()
            wait.until(lambda d: d.find_elements(By.ID, "sqs-queues"))
            shot(d, out, "console-queues.png")
            d.find_element(By.ID, "nav-store").click()
            wait.until(lambda d: d.find_elements(By.ID, "store-node-n1"))
            d.find_element(By.ID, "store-cell-name").send_keys("cfg-demo")
            d.find_element(By.ID, "store-cell-show").click()
            wait.until(lambda d: d.find_elements(By.ID, "store-replicas"))
            shot(d, out, "console-store.png")
            stop.set()
            operator = sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60,
                                  operator_token=token)  # the traffic thread holds c
            shard = operator.status()["cells"]["cell-1"]["shards"]["functions"][
                f"{doc['account_id']}/orders"]
            frozen = shard[-1]
            pid = int(json.load(open(os.path.join(state, "region.json")))["components"][
                frozen]["pid"])
            d.find_element(By.ID, "nav-map").click()
            os.kill(pid, signal.SIGSTOP)
            try:
                wait.until(lambda d: d.find_element(By.ID, f"agent-state-{frozen}").text
                           == "failed")
                shot(d, out, "console-map-failed.png")
            finally:
                os.kill(pid, signal.SIGCONT)
            d.get(doc["endpoint"] + "/console/logout")
            d.delete_all_cookies()
            d.get(doc["endpoint"] + "/console/login")
            shot(d, out, "console-login.png")
        finally:
            d.quit()
    finally:
        stop.set()
        subprocess.run([sys.executable, "-m", "cellcloud", "down", "--state-dir", state])
        for p in nodes:
            p.kill()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
