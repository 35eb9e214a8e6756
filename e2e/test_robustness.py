"""The page under adverse conditions: no WebGPU adapter, an interrupted download, a cache holding an older bundle
version, storage that refuses writes. Each ends in a fallback or a clear message.

A device lost after loading (idle or mid-reply) is covered by e2e/test_device_loss.py.
Not covered: a WebGPU device that fails during session creation. Simulating it (an adapter whose requestDevice
throws) left onnxruntime-web 1.30's WebGPU initialisation spinning at 100% CPU on the page's thread, so neither the
page's 60 s guard nor the fallback could run; it needs a fix on that side before a test can pass."""
import shutil

import pytest

from conftest import CHROMIUM_FLAGS  # noqa: F401  (same flags as the other e2e tests)

pytestmark = pytest.mark.e2e


def wait_ready(page, timeout=180_000):
    page.wait_for_function("document.body.dataset.ready", timeout=timeout)
    return page.evaluate("document.body.dataset.ready")


def test_no_webgpu_adapter_falls_back_to_wasm(browser, server):
    flags = [f for f in CHROMIUM_FLAGS if f != "--enable-unsafe-webgpu"] + ["--disable-webgpu"]
    b = browser.browser_type.launch(executable_path=shutil.which("chromium"), args=flags, headless=True)
    try:
        page = b.new_page()
        page.goto(f"{server}/?bundle=tiny-f32&ep=auto&autoload=1")
        assert wait_ready(page) == "1", page.inner_text("#error")
        badge = page.inner_text("#ep-badge")
        assert badge.startswith("WASM") and ("no WebGPU" in badge or "has no WebGPU" in badge), badge
    finally:
        b.close()


def test_interrupted_download_shows_error(page, server, bundle_dir):
    blob = (bundle_dir / "tiny-int8" / "weights-000.qzb").read_bytes()
    page.route("**/tiny-int8/weights-000.qzb",
               lambda route: route.fulfill(status=200, body=blob[: len(blob) // 2],
                                           headers={"Content-Type": "application/octet-stream"}))
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1")
    assert wait_ready(page) == "error"
    err = page.inner_text("#error")
    assert "weights-000.qzb" in err and "bytes" in err, err
    assert page.is_hidden("#chat")


def test_a_damaged_download_is_not_kept_in_the_cache(page, server, bundle_dir):
    """A blob that arrives with the right length but a flipped byte fails the load; the reload after the network
    recovers downloads it again (the failed load left nothing in the Cache API) and works."""
    blob = bytearray((bundle_dir / "tiny-int8" / "weights-000.qzb").read_bytes())
    blob[len(blob) // 2] ^= 0x5A
    url = "**/tiny-int8/weights-000.qzb"
    page.route(url, lambda route: route.fulfill(status=200, body=bytes(blob),
                                                headers={"Content-Type": "application/octet-stream"}))
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1")
    assert wait_ready(page) == "error"
    assert "weights-000.qzb" in page.inner_text("#error")
    page.unroute(url)
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1")
    assert wait_ready(page) == "1", page.inner_text("#error")


def test_corrupted_zlib_graph_is_named(page, server, bundle_dir):
    """A graph stored as a zlib stream (format version 3) that arrives damaged: the page names the file."""
    data = bytearray((bundle_dir / "tiny-int4" / "model.wasm.onnx.zlib").read_bytes())
    data[len(data) // 2] ^= 0x5A
    page.route("**/tiny-int4/model.wasm.onnx.zlib",
               lambda route: route.fulfill(status=200, body=bytes(data),
                                           headers={"Content-Type": "application/octet-stream"}))
    page.goto(f"{server}/?bundle=tiny-int4&ep=wasm&autoload=1")
    assert wait_ready(page) == "error"
    err = page.inner_text("#error")
    assert "model.wasm.onnx" in err and ("zlib" in err or "SHA-256" in err), err
    assert page.is_hidden("#chat")


def test_cache_with_older_version_is_not_used(page, server, bundle_dir, tmp_path):
    from converter.bundle import BuildOptions, write_bundle
    from converter.loaders import open_checkpoint
    import tiny

    name = "tiny-versioned"
    src = tmp_path / "src"
    tiny.write_hf(src, seed=1)
    write_bundle(open_checkpoint(src), bundle_dir / name, BuildOptions(scheme="f32", chunk_symbols=4096, force=True))
    page.goto(f"{server}/?bundle={name}&ep=wasm&autoload=1")
    assert wait_ready(page) == "1"
    first = page.evaluate("window.tinyqmoe.generate('the quick brown fox', {max_new_tokens: 8, raw: 'the quick brown fox'})")
    # a new version of the bundle under the same name (different weights)
    tiny.write_hf(src, seed=2)
    write_bundle(open_checkpoint(src), bundle_dir / name, BuildOptions(scheme="f32", chunk_symbols=4096, force=True))
    page.goto(f"{server}/?bundle={name}&ep=wasm&autoload=1")
    assert wait_ready(page) == "1"
    assert not page.inner_text("#progress-text").startswith("0.0 MB from network")
    second = page.evaluate("window.tinyqmoe.generate('the quick brown fox', {max_new_tokens: 8, raw: 'the quick brown fox'})")
    from test_page import cpu_tokens
    assert second["tokens"] == cpu_tokens(bundle_dir / name, "the quick brown fox", 8)
    assert second["tokens"] != first["tokens"]


def test_storage_refusing_writes_still_loads(page, server):
    page.add_init_script("""
      const realOpen = caches.open.bind(caches);
      caches.open = async (n) => { const c = await realOpen(n);
        c.put = async () => { throw new DOMException('simulated quota', 'QuotaExceededError'); }; return c; };""")
    page.goto(f"{server}/?bundle=tiny-f32&ep=wasm&autoload=1")
    assert wait_ready(page) == "1", page.inner_text("#error")
    assert page.is_visible("#chat")
