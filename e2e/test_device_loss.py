"""A WebGPU device lost after the model is loaded — idle, or in the middle of a reply — ends on WASM with a notice
saying why, reloaded from the browser cache, and the next reply equals the CPU reference."""
import pytest

from test_page import PROMPT, cpu_tokens, open_loaded, page_tokens

pytestmark = pytest.mark.e2e


def wait_reloaded_on_wasm(page):
    page.wait_for_function("document.body.dataset.ready === '1' && document.getElementById('ep-badge').textContent"
                           ".startsWith('WASM')", timeout=180_000)
    return page.inner_text("#notice")


def test_device_lost_when_idle_reloads_on_wasm(page, server, bundle_dir):
    open_loaded(page, server, "tiny-int4", "webgpu")
    assert page.inner_text("#ep-badge").startswith("WEBGPU")
    assert page.evaluate("window.tinyqmoe.loseDevice()") is True
    note = wait_reloaded_on_wasm(page)
    assert "WebGPU device lost (destroyed" in note and "WASM" in note, note
    assert page.is_hidden("#error")
    # reloaded on the WASM EP, tiny-int4 runs model.wasm.onnx
    assert page_tokens(page, PROMPT, 8)["tokens"] == cpu_tokens(bundle_dir / "tiny-int4", PROMPT, 8, graph="wasm")


def test_device_lost_during_a_reply_reloads_on_wasm(page, server, bundle_dir):
    open_loaded(page, server, "tiny-int4", "webgpu")
    page.evaluate("document.getElementById('max-tokens').value = 200")   # a reply long enough to interrupt
    page.fill("#input", "tell me a long story")
    page.click("#send-btn")
    page.wait_for_function("document.querySelector('.msg.assistant') && "
                           "document.querySelector('.msg.assistant').textContent.length > 0", timeout=120_000)
    page.evaluate("window.tinyqmoe.loseDevice()")
    note = wait_reloaded_on_wasm(page)
    assert "WebGPU" in note and "WASM" in note, note
    assert page.is_hidden("#error"), page.inner_text("#error")
    # reloaded on the WASM EP, tiny-int4 runs model.wasm.onnx
    assert page_tokens(page, PROMPT, 8)["tokens"] == cpu_tokens(bundle_dir / "tiny-int4", PROMPT, 8, graph="wasm")
