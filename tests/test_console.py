"""The web console in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium): sign in, a run's loss curve with a point per step, a checkpoint download,
the playground, a key revoked, and a run name full of HTML shown as text. Each view's
screenshot is written to the test's temporary folder (`CONSOLE_SCREENSHOTS` names another).
Without Chromium it is skipped, except under `LATHE_REQUIRE_BROWSER=1`, which `.ci/run` sets.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from lathe.local_server import LocalServer

from conftest import create_key

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

BASE = "tiny-qwen3"
HOSTILE = "<img src=x onerror=alert(1)>"
STEPS = 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_qwen3, tmp_path_factory):
    """(server, alice's key, the run's model id, its sampler checkpoint path)."""
    data = tmp_path_factory.mktemp("data")
    key = create_key("alice", data)
    with LocalServer({BASE: tiny_qwen3}, data, dev=False) as srv:
        service = tinker.ServiceClient(base_url=srv.base_url, api_key=key)
        training = service.create_lora_training_client(
            base_model=BASE, rank=4, user_metadata={"name": HOSTILE}
        ).result()
        ids = list(range(3, 40))
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:]},
        )
        for _ in range(STEPS):
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler = training.save_weights_for_sampler("for-console").result().path
        yield srv, key, training.model_id, sampler


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        missing = "no Chromium here: apt-get install chromium chromium-driver"
        if os.environ.get("LATHE_REQUIRE_BROWSER"):  # .ci/run installs it: never skip there
            pytest.fail(missing)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield b
    b.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait(browser, condition, timeout: float = 20):  # noqa: ANN001, ANN201
    return WebDriverWait(browser, timeout).until(condition)


def no_alert(browser) -> bool:  # noqa: ANN001
    try:
        _ = browser.switch_to.alert  # raises while none is open
    except NoAlertPresentException:
        return True
    return False


def test_the_console_end_to_end(trained, browser, shots):
    srv, key, model_id, sampler = trained
    console = f"{srv.base_url}/console"
    page = httpx.get(f"{console}/")
    assert "script-src 'self'" in page.headers["content-security-policy"]

    # sign in; the run list shows the hostile name as text
    browser.get(f"{console}/")
    field = wait(browser, ec.presence_of_element_located((By.NAME, "key")))
    browser.save_screenshot(str(shots / "signin.png"))
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "form.signin button").click()
    link = wait(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#runs tbody a")))
    assert link.text == HOSTILE
    assert browser.find_element(By.CSS_SELECTOR, "#runs td.steps").text == str(STEPS)
    assert browser.find_element(By.CSS_SELECTOR, "#runs td.live").text == "live"
    assert not browser.find_elements(By.CSS_SELECTOR, "#runs img") and no_alert(browser)
    browser.save_screenshot(str(shots / "runs.png"))

    # the run: a loss curve with a point per step, its checkpoints
    link.click()
    loss = wait(
        browser,
        ec.presence_of_element_located(
            (By.CSS_SELECTOR, '.chart[data-metric="forward_backward loss:sum"]')
        ),
    )
    assert len(loss.find_elements(By.CSS_SELECTOR, "circle.point")) == STEPS
    assert browser.find_element(By.CSS_SELECTOR, "td.run-name").text == HOSTILE
    row = wait(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#checkpoints tbody tr")))
    assert sampler in row.text
    browser.save_screenshot(str(shots / "run.png"))
    row.find_element(By.CSS_SELECTOR, "button.download").click()
    href = wait(
        browser, ec.presence_of_element_located((By.CSS_SELECTOR, "a.download-link"))
    ).get_attribute("href")
    archive = httpx.get(href, timeout=60)
    assert archive.status_code == 200 and archive.content[257:262] == b"ustar"  # a tar file

    # the playground samples the checkpoint
    browser.get(f"{console}/playground?mode=checkpoint&checkpoint={sampler}")
    prompt = wait(browser, ec.presence_of_element_located((By.ID, "prompt")))
    assert browser.find_element(By.ID, "model-a").get_attribute("value") == sampler
    prompt.send_keys("Hello")
    Select(browser.find_element(By.ID, "model-b")).select_by_value(BASE)  # side by side
    browser.find_element(By.ID, "sample").click()
    for side in "ab":
        wait(browser, ec.text_to_be_present_in_element((By.ID, f"meta-{side}"), "tokens"))
    browser.save_screenshot(str(shots / "playground.png"))

    # a new key, then revoked: it no longer works
    browser.get(f"{console}/keys")
    wait(browser, ec.element_to_be_clickable((By.ID, "create-key"))).click()
    new_key = wait(browser, ec.presence_of_element_located((By.ID, "new-key"))).text
    assert httpx.get(f"{srv.base_url}/api/v1/status", headers={"X-API-Key": new_key}).is_success
    rows = browser.find_elements(By.CSS_SELECTOR, "#keys tbody tr")
    assert len(rows) == 2
    rows[-1].find_element(By.CSS_SELECTOR, "button.revoke").click()
    wait(browser, ec.alert_is_present()).accept()
    wait(
        browser,
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#keys tbody tr:last-child"), "revoked"),
    )
    browser.save_screenshot(str(shots / "keys.png"))
    refused = httpx.get(f"{srv.base_url}/api/v1/status", headers={"X-API-Key": new_key})
    assert refused.status_code == 401

    browser.get(f"{console}/sessions")
    wait(browser, ec.presence_of_element_located((By.CSS_SELECTOR, "#sessions li")))
    browser.save_screenshot(str(shots / "sessions.png"))

    # the server's live status
    browser.get(f"{console}/status")
    wait(browser, ec.text_to_be_present_in_element((By.ID, "status-raw"), "base_models"))
    browser.save_screenshot(str(shots / "status.png"))
    assert no_alert(browser)
