"""The chat page in a real headless Chromium, against a real ``rxrt serve --http``: a key asked for,
two turns typed, each answer seen streaming in and equal to what the API answers for the same seed,
each turn's memory update seen arriving, and the heatmap growing a column per turn.

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` (the test extra). Without them
the test skips, saying what is missing; CI (``.ci/run``) sets ``RXRT_REQUIRE_BROWSER=1``, which makes
that a failure, so a CI machine without a browser cannot pass it silently."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import openai
import pytest

from .http_server import ASK_NAME, JULIA

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

KEY = "sk-page"
SEED, MAX_TOKENS = 7, 16


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or a skip (a failure under RXRT_REQUIRE_BROWSER=1) naming what is missing."""
    chromium = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = f"the page's browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("RXRT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RXRT_REQUIRE_BROWSER=1 and {reason}")
        pytest.skip(reason)
    assert chromium is not None and driver is not None
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            return bool(json.loads(reply.read())["status"] == "ready")
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``rxrt serve --http`` (the shipped model) with an API key."""
    _browser()  # skip before starting anything
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path_factory.mktemp("page") / "stm.db"
    command = [sys.executable, "-m", "rxruntime.cli", "serve", "--model", "small", "--http", f"127.0.0.1:{port}"]
    command += ["--store", f"sqlite:///{store}", "--api-key", KEY]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser()
    options = Options()
    options.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


# Records every text the streaming answer shows, one per DOM change, so a test sees it grow even
# when several deltas arrive in one network read (the page replaces the text node at each delta),
# and every state a turn's memory line goes through.
_WATCH = """
window.__shown = [];
window.__memory = [];
new MutationObserver((records) => {
  for (const r of records) {
    const turn = r.target.parentElement && r.target.parentElement.dataset.turn;
    if (r.type === 'childList' && r.target.classList.contains('text') && r.addedNodes.length) {
      window.__shown.push({turn, text: r.addedNodes[0].textContent});
    } else if (r.type === 'attributes' && r.target.classList.contains('memory')) {
      window.__memory.push({turn, state: r.target.dataset.state});
    }
  }
}).observe(document.getElementById('transcript'), {
  childList: true, subtree: true, attributes: true, attributeFilter: ['data-state'],
});
"""


def _wait(browser: WebDriver, what: str, script: str, timeout: float = 180) -> Any:
    """Poll a JavaScript expression until it is truthy; fail with ``what`` if it never is."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(
        lambda b: b.execute_script(f"return {script}"), message=what
    )


def _turn(browser: WebDriver, number: int, text: str, submit_with_enter: bool) -> tuple[str, list[str]]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    query = browser.find_element(By.ID, "query")
    _wait(browser, "the message box is enabled", "!document.getElementById('query').disabled")
    query.send_keys(text)
    if submit_with_enter:
        query.send_keys(Keys.ENTER)
    else:
        browser.find_element(By.ID, "send").click()
    item = f"document.querySelector('#transcript li.assistant[data-turn=\"{number}\"]')"
    _wait(browser, f"turn {number} answered", f"{item} && ['answered', 'cut'].includes({item}.dataset.state)")
    memory = f"{item}.querySelector('.memory')"
    _wait(browser, f"turn {number}'s memory update committed", f"{memory}.dataset.state === 'committed'")
    assert "committed" in browser.execute_script(f"return {memory}.textContent")
    states = browser.execute_script(f"return window.__memory.filter(m => m.turn === '{number}').map(m => m.state)")
    assert states == ["started", "committed"]  # shown as it starts, then as it commits
    answer = str(browser.execute_script(f"return {item}.querySelector('.text').textContent"))
    shown = browser.execute_script(f"return window.__shown.filter(s => s.turn === '{number}').map(s => s.text)")
    return answer, [str(s) for s in shown]


def _heatmap(browser: WebDriver) -> tuple[list[str], list[list[float]]]:
    columns = browser.execute_script(
        "return [...document.querySelectorAll('#heatmap thead th[data-turn]')].map(th => th.dataset.turn)"
    )
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#heatmap tbody tr')]"
        ".map(tr => [...tr.querySelectorAll('td')].map(td => Number(td.dataset.change)))"
    )
    painted = browser.execute_script(
        "return [...document.querySelectorAll('#heatmap td')].every(td => td.style.backgroundColor !== '')"
    )
    assert painted
    return [str(c) for c in columns], [[float(v) for v in row] for row in rows]


def test_two_turns_stream_and_the_memory_fills_the_heatmap(server: str, browser: WebDriver) -> None:
    from selenium.webdriver.common.by import By

    api = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
    layers = api.models.list().data[0].model_extra["rxrt"]["layers"]  # type: ignore[index]

    browser.get(f"{server}/")  # the page itself needs no key
    _wait(browser, "the page asks for a key", "!document.getElementById('key-form').hidden")
    key = browser.find_element(By.ID, "key")
    key.send_keys("sk-wrong\n")
    _wait(browser, "a wrong key is refused", "document.getElementById('key-error').textContent.length > 0")
    key.send_keys(KEY + "\n")
    _wait(browser, "the key is taken", "document.getElementById('key-form').hidden")
    assert browser.find_element(By.ID, "model").text.startswith("Model rxt")
    assert browser.execute_script("return sessionStorage.getItem('rxrt-api-key')") == KEY

    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    for field, value in (("temperature", 0), ("max-tokens", MAX_TOKENS), ("seed", SEED)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.execute_script(_WATCH)

    answers = []
    for number, text in ((1, JULIA), (2, ASK_NAME)):
        answer, shown = _turn(browser, number, text, submit_with_enter=number == 2)
        answers.append(answer)
        assert answer
        # it streamed: more than one text was shown, each growing from the one before, ending as the answer
        assert len(set(shown)) >= 2, shown
        assert all(b.startswith(a) for a, b in itertools.pairwise(shown)), shown
        assert shown[-1] == answer
        columns, rows = _heatmap(browser)
        assert columns == [str(n) for n in range(1, number + 1)]  # one column per turn
        assert len(rows) == layers and all(len(row) == number for row in rows)
        assert all(v > 0 for row in rows for v in row)  # every layer moved

    # the same seed, the same greedy decoding, through the API: the same two answers
    conv = api.conversations.create(extra_body={"seed": SEED})
    for text, seen in zip((JULIA, ASK_NAME), answers):
        reply = api.responses.create(
            model="rxt", input=text, conversation=conv.id, temperature=0, max_output_tokens=MAX_TOKENS
        )
        assert reply.output_text == seen

    # "New conversation" starts over: the transcript and the heatmap are cleared
    browser.find_element(By.ID, "new").click()
    assert browser.execute_script("return document.querySelectorAll('#transcript li').length") == 0
    assert _heatmap(browser) == ([], [])
