"""The Gradio demo driven in a real headless Chromium: an image appears; an empty prompt gets a message; a
ControlNet model's control image is uploaded, its edge map shown and the images generated under its control."""
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


def serve_demo(config, model_path):
    """Start scripts/interface.py on `config` and `model_path` on a free port; yields its URL, stops it after."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts/interface.py"), "--config", str(config),
                             "--model_path", str(model_path), "--port", str(port), "--device", "cpu"],
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


@pytest.fixture(scope="module")
def demo_url(tiny_pipeline):
    root, config = tiny_pipeline
    yield from serve_demo(config, root / "model.pth")


def open_page(url):
    """A fresh page (playwright starts Chromium with a new empty profile) on the demo at `url`."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page()
        page.goto(url, timeout=60_000)
        yield page
        browser.close()


@pytest.fixture
def page(demo_url):
    yield from open_page(demo_url)


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


# ---------------------------------------------------------------- the ControlNet tab

@pytest.fixture(scope="module")
def controlnet_demo(tiny_pipeline):
    """The demo serving a tiny ControlNet (one copied block of a 2-block toy-sized PixArt, every weight random and
    nonzero, so the control changes the image) with the tiny pipeline's T5, VAE and toy dataset; yields (url, root)."""
    from diffusion.model.nets import ControlPixArtHalf, PixArt
    from diffusion.utils.checkpoint import save_weights
    from tests.conftest import randomize, write_tiny_pipeline_config
    root, _ = tiny_pipeline
    base = PixArt(input_size=8, hidden_size=96, depth=2, num_heads=4, caption_channels=32, model_max_length=48)
    model = randomize(ControlPixArtHalf(base, copy_blocks_num=1), seed=4, scale=0.02)
    save_weights(model.state_dict(), root / "controlnet.pth")
    config = write_tiny_pipeline_config(root / "controlnet_config.py", root, depth=2)
    for url in serve_demo(config, root / "controlnet.pth"):
        yield url, root


@pytest.fixture
def controlnet_page(controlnet_demo):
    yield from open_page(controlnet_demo[0])


def test_the_controlnet_tab_uploads_a_control_image_shows_its_edge_map_and_generates(controlnet_page, controlnet_demo,
                                                                                    tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from diffusion.data.conditions import make_condition
    from diffusion.data.toy_shapes import Scene, Shape, render_scene
    page = controlnet_page
    photo = render_scene(Scene("gray", (Shape("red", "circle", "large", "left"),
                                        Shape("blue", "square", "small", "top right"))), 64)
    photo.save(tmp_path / "scene.png")
    page.locator("#prompt textarea").fill("a large red circle on the left, on a gray background")
    page.locator("#control-image input[type=file]").set_input_files(str(tmp_path / "scene.png"))
    page.locator("#control-image img").first.wait_for(state="visible", timeout=60_000)  # the upload is shown
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)
    status = page.locator("#status").inner_text(timeout=30_000)
    assert status.startswith("Generated 1 image(s) of 64 x 64") and "controlled by Canny edges at scale 1" in status
    shown = page.locator("#condition img").first
    shown.wait_for(state="visible", timeout=30_000)
    src = shown.get_attribute("src")
    with urllib.request.urlopen(src if src.startswith("http") else controlnet_demo[0].rstrip("/") + src) as response:
        edge_map = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    expected = ((make_condition(photo, 64, 64, "canny")[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert edge_map.shape == (64, 64, 3) and (expected > 0).any()
    assert (edge_map == expected).all()  # the Canny edge map of the upload, exactly (sent as PNG)


def test_the_controlnet_tab_without_a_control_image_samples_the_base_model_and_says_so(controlnet_page):
    page = controlnet_page
    page.locator("#prompt textarea").fill("a large red circle on the left, on a gray background")
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for(state="visible", timeout=120_000)
    assert "without control (no control image)" in page.locator("#status").inner_text(timeout=30_000)
