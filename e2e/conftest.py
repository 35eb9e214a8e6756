"""End-to-end fixtures: bundles built in the test session, the real server on a free port, Debian's Chromium."""
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHROMIUM_FLAGS = ["--enable-unsafe-webgpu", "--no-sandbox", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "e2e" / "artifacts"


def _skip_reason() -> str | None:
    if not shutil.which("chromium"):
        return "Debian chromium is not installed (tools/setup.sh installs it)"
    if not (ROOT / "node_modules" / "onnxruntime-web" / "dist").is_dir():
        return "node_modules is missing (npm ci, run by tools/setup.sh)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright (PyPI) is not installed"
    return None


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    import tiny
    from converter.bundle import BuildOptions, write_bundle
    from converter.loaders import default_model_path, open_checkpoint

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("served")
    src = root.parent / "tiny-src"
    tiny.write_hf(src, tied=True, dtype="bf16")
    ck = open_checkpoint(src)
    # every int8 (K, N) table the wasm graphs multiply is cut into pieces of columns, as a 1B model's layers are
    # (the tiny layers are below LAYER_PIECE_MIN_WEIGHTS), so that the page's placement of them runs
    import converter.bundle as bundle_mod
    keep, bundle_mod.LAYER_PIECE_MIN_WEIGHTS = bundle_mod.LAYER_PIECE_MIN_WEIGHTS, 0
    try:
        write_bundle(ck, root / "tiny-f32", BuildOptions(scheme="f32", chunk_symbols=4096))
        # graph, tokenizer and tables files compressed even though they are small, so the page's paths for them run on
        # tiny models: zlib streams (format version 3) in tiny-int4, QZ chunks (as version 2 wrote them) in tiny-int8;
        # the embedding int8-e5 (entropy-constrained int8, laid out as int8-g32), so the page runs that scheme too
        write_bundle(ck, root / "tiny-int4", BuildOptions(scheme="int4-g32", embed_scheme="int8-e5",
                                                          chunk_symbols=4096, compress_files_from=0))
        write_bundle(ck, root / "tiny-int8", BuildOptions(scheme="int8", chunk_symbols=4096, compress_files_from=0,
                                                          file_codec="qz"))
        # int4-m32 everywhere: the wasm graph multiplies 8-bit codes the page folds from the codes, zero points and
        # multipliers, and gathers the embedding's rows from the lm_head's; model.onnx reads loader-made block scales
        write_bundle(ck, root / "tiny-int4m", BuildOptions(scheme="int4-m32", embed_scheme="int4-m32", chunk_symbols=4096))
        # the default build's layout (int4-m32 with an int8 embedding): the wasm graph reads the int8 table in pieces
        # of columns, which the page's decoders place in that order (loader.js placePieces, layouts.column_pieces),
        # and here the layers' multiplied codes too, as it does for a 1B model's (the tiny ones are below that size)
        write_bundle(ck, root / "tiny-int4m8", BuildOptions(scheme="int4-m32", embed_scheme="int8", chunk_symbols=4096))
    finally:
        bundle_mod.LAYER_PIECE_MIN_WEIGHTS = keep
    try:
        write_bundle(open_checkpoint(default_model_path()), root / "smollm2-int8", BuildOptions(scheme="int8"))
    except Exception as e:  # the real model is optional for the tiny-model tests
        print(f"SmolLM2 bundle not built: {e}")
    return root


@pytest.fixture(scope="session")
def server(bundle_dir):
    import uvicorn

    from web.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(bundle_dir), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(5)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.console_messages = []
    pg.on("console", lambda m: pg.console_messages.append(m.text))
    yield pg
    ctx.close()
