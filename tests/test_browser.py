"""The web playground and the seed's JavaScript example in headless Chromium (Debian's, driven by Playwright)."""

import shutil
import time
from pathlib import Path

import pytest

from servers import ImageServer, WanrtServer

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]

SEED_JS = """
async function generateVideo(imageUrl, prompt) {
  // Start generation
  const response = await fetch('API/generate', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({
      image_url: imageUrl,
      prompt: prompt,
      steps: 2,
      frames: 16, width: 256, height: 256
    })
  });

  const { job_id } = await response.json();
  console.log(`Job started: ${job_id}`);

  // Poll for completion
  while (true) {
    const statusResponse = await fetch(`API/status/${job_id}`);
    const status = await statusResponse.json();

    console.log(`Status: ${status.status}, Progress: ${status.progress || 0}%`);

    if (status.status === 'completed') {
      // Download video
      const videoResponse = await fetch(`API/download/${job_id}`);
      const videoBlob = await videoResponse.blob();

      // Create download link
      const url = URL.createObjectURL(videoBlob);
      const a = document.createElement('a');
      a.href = url;
      a.download = 'generated_video.mp4';
      a.click();
      window.seedResult = { job_id, size: videoBlob.size, type: videoBlob.type };
      break;
    } else if (status.status === 'error') {
      console.error(`Error: ${status.error}`);
      window.seedResult = { error: status.error };
      break;
    }

    await new Promise(resolve => setTimeout(resolve, 500));
  }
}
"""


def wait_until(page, expression: str, timeout: int) -> None:
    """Poll a JS expression with page.evaluate (DevTools evaluation, exempt from the page's CSP), where
    Playwright's wait_for_function compiles it with eval, which /ui's Content-Security-Policy forbids."""
    deadline = time.time() + timeout / 1000
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    from safetensors.torch import save_file

    from lora_fixtures import as_format, random_lora

    lib = tmp_path_factory.mktemp("ui_loras")
    save_file(as_format(random_lora(tiny_model.transformer_high, rank=4, seed=1), "peft"), str(lib / "style.safetensors"))
    with ImageServer() as images, WanrtServer(tmp_path_factory.mktemp("ui"), WANRT_LORA_DIR=lib,
                                              WANRT_MAX_LORA_RANK=8) as server:
        yield images, server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_playground_generates_and_plays_a_video(env, browser):
    images, server = env
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.base + "/ui/")
    page.wait_for_selector("#steps")  # ranges and defaults loaded from /schema
    assert page.get_attribute("#steps", "max") == "20" and page.input_value("#width") == "640"
    page.fill("#image_url", images.url("/img.jpg"))
    page.fill("#prompt", "a cat turning its head slowly")
    for name, value in (("width", "256"), ("height", "256"), ("frames", "16"), ("steps", "2")):
        page.fill(f"#{name}", value)
    page.click("#submit")
    wait_until(page, "document.getElementById('state').textContent.startsWith('completed')", timeout=180_000)
    assert page.text_content("#via") in ("live (SSE)", "polling")
    wait_until(page, "(() => { const v = document.getElementById('video');"
                           " return v.readyState >= 2 && v.duration > 0; })()", timeout=30_000)
    duration = page.evaluate("document.getElementById('video').duration")
    assert abs(duration - 1.0) < 0.15  # 16 frames at 16 fps
    page.evaluate("document.getElementById('video').play()")
    wait_until(page, "document.getElementById('video').currentTime > 0.1", timeout=15_000)
    assert page.get_attribute("#download", "href").startswith("/download/")
    assert page.locator("#jobs tr").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    # delete from the list
    job_id = page.text_content("#job_id")
    page.click(f"button[data-delete='{job_id}']")
    wait_until(page, f"!document.querySelector(\"button[data-delete='{job_id}']\")", timeout=10_000)
    assert errors == []
    page.close()


def test_playground_upload_and_error_display(env, browser, tmp_path):
    from servers import image_bytes

    images, server = env
    f = tmp_path / "frame.png"
    f.write_bytes(image_bytes("PNG"))
    page = browser.new_page()
    page.goto(server.base + "/ui/")
    page.wait_for_selector("#steps")
    page.set_input_files("#image_file", str(f))
    for name, value in (("width", "256"), ("height", "256"), ("frames", "16"), ("steps", "1")):
        page.fill(f"#{name}", value)
    page.click("#submit")
    wait_until(page, "document.getElementById('job_id').textContent.length > 8", timeout=30_000)
    wait_until(page, "document.getElementById('state').textContent.startsWith('completed')", timeout=180_000)
    # a bad URL shows the API's detail
    page.set_input_files("#image_file", [])
    page.fill("#image_url", "http://169.254.169.254/latest/meta-data/")
    page.click("#submit")
    wait_until(page, "document.getElementById('error').textContent.includes('400')", timeout=30_000)
    assert "not allowed" in page.text_content("#error")
    page.close()


def test_seed_javascript_example_from_another_origin(env, browser):
    """The seed's browser example, run from the image server's origin: only CORS lets it work."""
    images, server = env
    images.routes["/client.html"] = (200, "text/html", b"<!doctype html><title>client</title><p>other origin</p>")
    page = browser.new_page()
    page.goto(images.url("/client.html"))
    assert page.evaluate("location.origin") != server.base
    page.add_script_tag(content=SEED_JS.replace("API", server.base))
    page.evaluate(f"generateVideo('{images.url('/img.png')}', 'person smiling and waving')")
    wait_until(page, "window.seedResult !== undefined", timeout=180_000)
    result = page.evaluate("window.seedResult")
    assert result.get("type") == "video/mp4" and result["size"] > 1000, result
    page.close()


def test_playground_shows_the_live_preview(env, browser):
    """While the job runs the playground shows the latest preview (an animated WebP fetched from /preview)."""
    images, server = env
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.base + "/ui/")
    page.wait_for_selector("#steps")
    page.fill("#image_url", images.url("/img.jpg"))
    for name, value in (("width", "256"), ("height", "256"), ("frames", "16"), ("steps", "2")):
        page.fill(f"#{name}", value)
    assert page.is_hidden("#preview_box")
    page.click("#submit")
    # the preview arrives while the job is still processing (the VAE decode follows the last step)
    wait_until(page, "(() => { const p = document.getElementById('preview');"
                     " return p.complete && p.naturalWidth > 0 && p.dataset.step !== ''; })()", timeout=180_000)
    assert page.evaluate("document.getElementById('preview').src").startswith("blob:")
    assert page.evaluate("[document.getElementById('preview').naturalWidth,"
                         " document.getElementById('preview').naturalHeight]") == [256, 256]
    assert "step" in page.text_content("#preview_caption") and page.is_visible("#preview_box")
    wait_until(page, "document.getElementById('state').textContent.startsWith('completed')", timeout=180_000)
    assert page.evaluate("document.getElementById('preview').dataset.step") == "2"  # the last step's preview
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-preview.png"), full_page=True)
    assert errors == []
    page.close()


def test_playground_picks_loras(env, browser):
    images, server = env
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.base + "/ui/")
    page.wait_for_selector("#steps")
    deadline = time.time() + 120  # the worker publishes its library once its model is loaded
    while page.is_hidden("#loras_box"):
        assert time.time() < deadline, "the LoRA picker never appeared"
        page.reload()
        page.wait_for_selector("#steps")
        page.wait_for_timeout(500)
    page.click("#add_lora")
    assert page.eval_on_selector_all("#loras .lora_name option", "os => os.map(o => o.value)") == ["style"]
    page.fill("#loras .lora_strength", "0.5")
    page.select_option("#loras .lora_expert", "high")
    page.fill("#image_url", images.url("/img.jpg"))
    for name, value in (("width", "256"), ("height", "256"), ("frames", "16"), ("steps", "1")):
        page.fill(f"#{name}", value)
    page.click("#submit")
    wait_until(page, "document.getElementById('state').textContent.startsWith('completed')", timeout=180_000)
    job_id = page.text_content("#job_id")
    status = page.evaluate(f"fetch('/status/{job_id}').then(r => r.json())")
    assert status["params"]["loras"] == [{"name": "style", "strength": 0.5, "expert": "high"}]
    assert errors == []
    page.close()
