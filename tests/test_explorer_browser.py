"""The explorer in a real headless Chromium: type a prompt, read the graph, click, patch; bad input in the
page. Skipped without Chromium, chromedriver or selenium, unless MINTERP_TL_REQUIRE_BROWSER=1 (CI): then
that is a failure. Screenshots go to the test's folder (MINTERP_TL_SCREENSHOTS: another folder)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from minterp_tl.explorer import Explorer
from minterp_tl.explorer.server import App, make_server
from minterp_tl.routes import build_graph

PROMPT, CORRUPTED = "The capital of France is", "The capital of Italy is"


def _need(what: str) -> None:
    message = f"the explorer's browser tests need {what}"
    if os.environ.get("MINTERP_TL_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " (MINTERP_TL_REQUIRE_BROWSER=1)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def page(smollm2, hf_model, tmp_path_factory):
    """``(driver, app, url, shots)``: Chromium on the explorer serving SmolLM2 on a free localhost port."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need("selenium (pip install -e '.[test]')")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        _need("the Debian packages chromium and chromium-driver")
    models = {"smollm2-135m": smollm2, "tiny-gpt2": hf_model("gpt2")}

    def loader(name: str):
        if name not in models:
            raise ValueError(f"unknown model {name!r}; known here: {sorted(models)}")
        return models[name]

    app = App(Explorer(smollm2), loader=loader, name="smollm2-135m")
    httpd = make_server(app)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    shots = Path(os.environ.get("MINTERP_TL_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        yield driver, app, f"http://127.0.0.1:{httpd.server_address[1]}/", shots
    finally:
        driver.quit()
        httpd.shutdown()
        httpd.server_close()


def _wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _by_id(driver, name: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def _all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _click(driver, element) -> None:
    """A click dispatched on the element (SVG lines are thin; a pointer click could land beside them)."""
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)


def _idle(driver) -> None:
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-busy") is None)


def _run(driver, prompt: str) -> None:
    box = _by_id(driver, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.execute_script("delete document.body.dataset.ready")
    _by_id(driver, "run").click()


def test_graph_clicks_threshold_and_patching(page):
    driver, app, url, shots = page
    driver.get(url)
    _run(driver, PROMPT)
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert "smollm2-135m" in _by_id(driver, "model-name").text
    assert '" Paris"' in _by_id(driver, "prediction").text
    driver.save_screenshot(str(shots / "explorer.png"))

    # the last representation's top tokens hold the answer
    last = _all(driver, 'svg .node[data-id="I29_5"]')[0]
    _click(driver, last)
    _wait(driver, lambda d: d.find_elements("id", "rep-panel"))
    assert '" Paris"' in _by_id(driver, "panel").text

    # the head named in the edge panel is the one with the largest share of that edge in the graph
    graph = build_graph(app.explorer.llm, 0, threshold=0.04, progress=False)
    path = app.explorer.graph(threshold=0.04)["paths"][0]["nodes"]
    source, target = next((u, v) for u, v in zip(path, path[1:]) if v.startswith("A"))
    line = _all(driver, f'svg .edge[data-source="{source}"][data-target="{target}"]')[0]
    _click(driver, line)
    _wait(driver, lambda d: d.find_elements("id", "edge-head"))
    shares = graph.edges[source, target]["heads"]
    layer = int(target[1:].split("_")[0])
    expected = max(range(len(shares)), key=shares.__getitem__)
    assert _by_id(driver, "edge-head").text == f"L{layer}H{expected}"
    driver.save_screenshot(str(shots / "explorer-edge.png"))

    # an FFN block, then one of its neurons
    _click(driver, _all(driver, "svg .node.ffn")[-1])
    _wait(driver, lambda d: d.find_elements("id", "ffn-panel"))
    _click(driver, _all(driver, "a.neuron")[0])
    _wait(driver, lambda d: "writes" in d.find_element("id", "neuron-panel").text)

    # a higher threshold draws fewer edges
    counts = []
    for tau in ("0.02", "0.2"):
        driver.execute_script(
            "const s = document.getElementById('threshold'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('change'));",
            tau,
        )
        _wait(driver, lambda d, tau=tau: d.find_element("id", "threshold").get_attribute("value") == tau)
        _idle(driver)
        counts.append(int(_by_id(driver, "edge-count").text))
        assert counts[-1] == len(_all(driver, "svg .edge"))
    assert counts[1] < counts[0]

    # the patching view: a cell of the heatmap opens that patched run's lens
    corrupted = _by_id(driver, "corrupted")
    corrupted.clear()
    corrupted.send_keys(CORRUPTED)
    _by_id(driver, "patch").click()
    _wait(driver, lambda d: d.find_elements("id", "patch-table"))
    cell = _all(driver, '#patch-table td[data-layer="0"][data-pos="4"]')[0]
    assert float(cell.text) == pytest.approx(1.0, abs=0.01)  # the differing token at the embeddings
    _click(driver, cell)
    _wait(driver, lambda d: d.find_elements("id", "patched-title"))
    assert '" Paris"' in _by_id(driver, "patched-lens").text.splitlines()[-1]
    driver.save_screenshot(str(shots / "explorer-patching.png"))
    assert _by_id(driver, "error").text == ""


def test_bad_input_shows_a_message_and_the_server_keeps_serving(page):
    driver, app, url, shots = page
    driver.get(url)
    for prompt, message in (("   ", "the prompt is empty"), ("word " * 80, "at most 64 are accepted")):
        _run(driver, prompt)
        _wait(driver, lambda d, m=message: m in d.find_element("id", "error").text)
    _run(driver, PROMPT)
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert _by_id(driver, "error").text == ""
    corrupted = _by_id(driver, "corrupted")
    corrupted.clear()
    corrupted.send_keys("The capital of the Republic of Italy is")
    _by_id(driver, "patch").click()
    _wait(driver, lambda d: "same number of tokens" in d.find_element("id", "error").text)
    _by_id(driver, "model").send_keys("gpt-17")
    _by_id(driver, "load").click()
    _wait(driver, lambda d: "could not load model 'gpt-17'" in d.find_element("id", "error").text)
    driver.save_screenshot(str(shots / "explorer-error.png"))
    _run(driver, PROMPT)  # still serving, still the same model
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert '" Paris"' in _by_id(driver, "prediction").text
