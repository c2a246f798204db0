"""The Gradio demo driven in a real headless Chromium: an image appears; an empty prompt gets a message."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from tests.conftest import REPO

CHROMIUM = "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (.ci/run installs it)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tiny_pipeline):
    root, config = tiny_pipeline
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts/interface.py"), "--config", str(config),
                             "--model_path", str(root / "model.pth"), "--port", str(port), "--device", "cpu"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo exited: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail("the demo did not start within 180 s")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def page(demo_url):
    """A fresh page (playwright starts Chromium with a new empty profile) on the demo."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page()
        page.goto(demo_url, timeout=60_000)
        yield page
        browser.close()


def test_generate_shows_an_image(page):
    page.locator("#prompt textarea").fill("a large red circle on a gray background")
    page.locator("#generate").click()
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=120_000)
    assert page.locator("#status").inner_text(timeout=30_000).startswith("Generated 1 image(s) of 64 x 64")


def test_empty_prompt_gets_a_visible_message(page):
    page.locator("#generate").click()
    page.get_by_text("Please enter a prompt.").first.wait_for(state="visible", timeout=60_000)
    assert page.locator("#gallery img").count() == 0


def test_a_prompt_over_the_token_limit_gets_a_visible_message(page):
    page.locator("#prompt textarea").fill("a large red circle on a gray background " * 4)
    page.locator("#generate").click()
    page.get_by_text("the model reads at most 48").first.wait_for(state="visible", timeout=60_000)


def test_a_toy_model_offers_clickable_examples_and_names_its_vocabulary(page, tiny_pipeline):
    from diffusion.data.toy_shapes import example_prompts
    prompts, held_out = example_prompts(tiny_pipeline[0] / "toy")
    note = page.locator("#vocabulary")
    assert "knows one small grammar" in note.inner_text(timeout=30_000)
    assert f"{held_out[0][0]} {held_out[0][1]}" in note.inner_text()
    page.get_by_text(prompts[-1]).first.click()  # an unseen-pair example
    from playwright.sync_api import expect
    # the example reaches the textbox after a round trip to the server: wait for it (input_value does not)
    expect(page.locator("#prompt textarea")).to_have_value(prompts[-1], timeout=30_000)
    page.locator("#generate").click()
    image = page.locator("#gallery img").first
    image.wait_for(state="visible", timeout=120_000)
    assert image.evaluate("img => getComputedStyle(img).imageRendering") in ("pixelated", "crisp-edges")
