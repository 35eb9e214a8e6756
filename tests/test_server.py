"""The dev server (web/): listing, byte ranges, HEAD, ETag, MIME, isolation headers, path traversal, methods, /py,
and many parallel downloads through a real uvicorn.

The file tree is built here in tmp_path:

    tree/
      secret.txt                      outside every root: must never be served
      outside/secret2.txt
      outside-bundle/manifest.json    a valid bundle outside bundle_dir, reached by a symlink
      static/  index.html app.js sub/x.wasm  inner.js -> app.js  leak.txt -> ../secret.txt  leakdir -> ../outside
      bundles/ tiny-a/ (manifest.json weights-000.qzb model.onnx)  b-second/  .building/  broken/  other/
               nomanifest/  stray.txt  linked -> ../outside-bundle
      node_modules/onnxruntime-web/dist/ (ort.min.mjs ort-wasm.wasm)  node_modules/pyodide/ (pyodide.mjs ...)
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvicorn
from starlette.testclient import TestClient

from web.app import BUNDLE_FORMAT, REPO, create_app, parse_range, RangeNotSatisfiable, resolve_under
from web.__main__ import describe

SECRET = b"TOP-SECRET-do-not-serve\n"
BLOB_SIZE = 1_500_000                               # several 256 KiB chunks
ISOLATION = {
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-embedder-policy": "require-corp",
    "cross-origin-resource-policy": "same-origin",
    "x-content-type-options": "nosniff",
}


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

def _manifest(scheme: str, embed_scheme: str, bundle_bytes: int) -> dict:
    return {"format": BUNDLE_FORMAT, "version": 1, "scheme": scheme, "embed_scheme": embed_scheme,
            "totals": {"bundle_bytes": bundle_bytes, "parameters": 1000, "bits_per_weight_all_in": 8.5}}


def _write_manifest(folder: Path, manifest: dict | str) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    raw = (manifest if isinstance(manifest, str) else json.dumps(manifest, indent=1)).encode()
    (folder / "manifest.json").write_bytes(raw)
    return raw


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tree")
    (root / "secret.txt").write_bytes(SECRET)
    (root / "outside").mkdir()
    (root / "outside" / "secret2.txt").write_bytes(SECRET)
    _write_manifest(root / "outside-bundle", _manifest("int8", "int8", 1))

    static = root / "static"
    (static / "sub").mkdir(parents=True)
    (static / "index.html").write_text("<!doctype html><title>tiny-qmoe</title>\n")
    (static / "sw.js").write_text("self.addEventListener('fetch', () => {});\n")
    (static / "app.js").write_text("export const answer = 42;\n")
    (static / "sub" / "x.wasm").write_bytes(b"\0asm\1\0\0\0")
    (static / "empty.txt").write_bytes(b"")
    os.symlink("app.js", static / "inner.js")                       # inside the root: allowed
    os.symlink("../secret.txt", static / "leak.txt")                # file symlink out of the root
    os.symlink("../outside", static / "leakdir")                    # directory symlink out of the root

    bundles = root / "bundles"
    raw_a = _write_manifest(bundles / "tiny-a", _manifest("int4-g32", "int8", 12345))
    blob = random.Random(0).randbytes(BLOB_SIZE)
    (bundles / "tiny-a" / "weights-000.qzb").write_bytes(blob)
    (bundles / "tiny-a" / "model.onnx").write_bytes(b"onnx-graph")
    (bundles / "tiny-a" / "warmup").mkdir()
    (bundles / "tiny-a" / "warmup" / "model.onnx").write_bytes(b"warm-up graph")
    (bundles / "tiny-a" / "extra").mkdir()
    (bundles / "tiny-a" / "extra" / "model.onnx").write_bytes(b"not listed")
    raw_b = _write_manifest(bundles / "b-second", _manifest("ternary", "int8", 999))
    _write_manifest(bundles / ".building", _manifest("int8", "int8", 1))    # build in progress
    _write_manifest(bundles / "broken", "{not json")
    _write_manifest(bundles / "other", {"format": "something-else", "version": 1})
    _write_manifest(bundles / "incomplete", {"format": BUNDLE_FORMAT, "version": 1})
    (bundles / "nomanifest").mkdir()
    (bundles / "stray.txt").write_text("not a folder")
    os.symlink("../outside-bundle", bundles / "linked")

    nm = root / "node_modules"
    (nm / "onnxruntime-web" / "dist").mkdir(parents=True)
    (nm / "onnxruntime-web" / "dist" / "ort.min.mjs").write_text("export default {};\n")
    (nm / "onnxruntime-web" / "dist" / "ort-wasm.wasm").write_bytes(b"\0asm\1\0\0\0")
    (nm / "onnxruntime-web" / "package.json").write_text("{}")
    (nm / "pyodide").mkdir()
    (nm / "pyodide" / "pyodide.mjs").write_text("export {};\n")
    (nm / "pyodide" / "python_stdlib.zip").write_bytes(b"PK\5\6" + bytes(18))

    return {"root": root, "static": static, "bundles": bundles, "node_modules": nm, "blob": blob,
            "raw_a": raw_a, "raw_b": raw_b}


@pytest.fixture(scope="module")
def app(tree):
    return create_app(tree["bundles"], static_dir=tree["static"], node_modules=tree["node_modules"])


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def server(app):
    """The app in a real uvicorn on a free loopback port, in a thread; yields (host, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def raw_get(server, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One request with the path sent exactly as given: http.client does not normalise "../" as httpx does."""
    conn = http.client.HTTPConnection(*server, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------------------------

def test_bundle_listing(client, tree, caplog):
    with caplog.at_level(logging.WARNING, logger="web.app"):
        r = client.get("/api/bundles")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    listing = r.json()
    # sorted; no ".building", "broken", "other", "incomplete", "nomanifest", "stray.txt", nor "linked" (outside)
    assert [b["name"] for b in listing] == ["b-second", "tiny-a"]
    assert listing[1] == {
        "name": "tiny-a", "scheme": "int4-g32", "embed_scheme": "int8", "bytes": 12345, "parameters": 1000,
        "bits_per_weight": 8.5, "version": 1, "manifest_sha256": hashlib.sha256(tree["raw_a"]).hexdigest(),
    }
    assert listing[0]["manifest_sha256"] == hashlib.sha256(tree["raw_b"]).hexdigest()
    logged = caplog.text
    assert "'broken'" in logged and "'other'" in logged and "'incomplete'" in logged
    assert "building" not in logged                                # ignored, not an error


def test_bundle_listing_missing_folder(tmp_path):
    with TestClient(create_app(tmp_path / "nope", static_dir=tmp_path)) as c:
        assert c.get("/api/bundles").json() == []


def test_format_name_matches_converter():
    from converter.bundle import FORMAT_NAME
    assert BUNDLE_FORMAT == FORMAT_NAME


# ---------------------------------------------------------------------------------------------------------------
# Files, ranges, HEAD, ETag
# ---------------------------------------------------------------------------------------------------------------

BLOB_URL = "/bundles/tiny-a/weights-000.qzb"


def test_full_get(client, tree):
    r = client.get(BLOB_URL)
    assert r.status_code == 200
    assert r.content == tree["blob"]
    assert r.headers["content-length"] == str(BLOB_SIZE)
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["cache-control"] == "no-cache"
    assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+"', r.headers["etag"])
    assert "content-encoding" not in r.headers


def test_index_and_empty_file(client):
    r = client.get("/")
    assert r.status_code == 200 and b"<title>tiny-qmoe</title>" in r.content
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    r = client.get("/static/empty.txt")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
    assert client.get("/static/empty.txt", headers={"Range": "bytes=0-"}).status_code == 416


def test_service_worker_is_served_at_the_root(client):
    """static/sw.js at /sw.js: a service worker's scope is its script's folder, and the page's offline copy must
    cover the whole site; no-cache, so that a new version is picked up at the next check."""
    r = client.get("/sw.js")
    assert r.status_code == 200 and b"addEventListener" in r.content
    assert r.headers["content-type"].startswith("text/javascript")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["cross-origin-embedder-policy"] == "require-corp"


@pytest.mark.parametrize("header, span", [
    ("bytes=0-99", (0, 100)),
    ("bytes=100-", (100, BLOB_SIZE)),
    ("bytes=-50", (BLOB_SIZE - 50, BLOB_SIZE)),
    ("bytes=10-10", (10, 11)),
    ("bytes=300000-900000", (300000, 900001)),                    # crosses chunk boundaries
    ("bytes=5-999999999999", (5, BLOB_SIZE)),                     # end clamped
    ("bytes=-99999999", (0, BLOB_SIZE)),                          # suffix longer than the file
    ("BYTES=1-2", (1, 3)),
])
def test_range(client, tree, header, span):
    r = client.get(BLOB_URL, headers={"Range": header})
    start, stop = span
    assert r.status_code == 206
    assert r.content == tree["blob"][start:stop]
    assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/{BLOB_SIZE}"
    assert r.headers["content-length"] == str(stop - start)


@pytest.mark.parametrize("header", [f"bytes={BLOB_SIZE}-", f"bytes={BLOB_SIZE + 10}-{BLOB_SIZE + 20}", "bytes=-0"])
def test_range_not_satisfiable(client, header):
    r = client.get(BLOB_URL, headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{BLOB_SIZE}"
    assert r.content == b""


@pytest.mark.parametrize("header", [
    "bytes=0-1,5-6",                        # several ranges: whole file (documented choice)
    f"bytes=0-1, {BLOB_SIZE}-",             # even when one of them is unsatisfiable
    "items=0-1", "bytes=5-1", "bytes=abc", "bytes=-", "bytes=1-2-3", "bytes=" + "9" * 30 + "-",
])
def test_range_ignored(client, tree, header):
    r = client.get(BLOB_URL, headers={"Range": header})
    assert r.status_code == 200 and r.content == tree["blob"]
    assert "content-range" not in r.headers


def test_parse_range_unit():
    assert parse_range("bytes=0-0", 1) == (0, 1)
    assert parse_range(" bytes=2-", 5) == (2, 5)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-1", 0)
    assert parse_range("bytes=0-1,2-3", 10) is None


def test_if_range(client, tree):
    etag = client.head(BLOB_URL).headers["etag"]
    r = client.get(BLOB_URL, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert r.status_code == 206 and r.content == tree["blob"][:10]
    r = client.get(BLOB_URL, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == tree["blob"]


def test_head(client):
    get = client.get(BLOB_URL)
    head = client.head(BLOB_URL)
    assert head.status_code == 200 and head.content == b""
    for name in ("content-length", "content-type", "etag", "last-modified", "cache-control", "accept-ranges"):
        assert head.headers[name] == get.headers[name], name
    head = client.head(BLOB_URL, headers={"Range": "bytes=10-19"})
    assert head.status_code == 206 and head.content == b""
    assert head.headers["content-length"] == "10"


def test_etag_304(client, tree):
    etag = client.get(BLOB_URL).headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        r = client.get(BLOB_URL, headers={"If-None-Match": header})
        assert r.status_code == 304, header
        assert r.content == b"" and r.headers["etag"] == etag and r.headers["cache-control"] == "no-cache"
    r = client.get(BLOB_URL, headers={"If-None-Match": '"other"'})
    assert r.status_code == 200 and r.content == tree["blob"]
    # If-None-Match wins over Range
    assert client.get(BLOB_URL, headers={"If-None-Match": etag, "Range": "bytes=0-1"}).status_code == 304


def test_etag_changes_with_file(client, tree):
    path = tree["static"] / "changing.txt"
    path.write_bytes(b"one")
    first = client.get("/static/changing.txt").headers["etag"]
    path.write_bytes(b"three")
    r = client.get("/static/changing.txt", headers={"If-None-Match": first})
    assert r.status_code == 200 and r.content == b"three" and r.headers["etag"] != first


@pytest.mark.parametrize("url, mime", [
    ("/static/sub/x.wasm", "application/wasm"),
    ("/vendor/ort/ort-wasm.wasm", "application/wasm"),
    ("/static/app.js", "text/javascript; charset=utf-8"),
    ("/vendor/ort/ort.min.mjs", "text/javascript; charset=utf-8"),
    ("/vendor/pyodide/pyodide.mjs", "text/javascript; charset=utf-8"),
    ("/vendor/pyodide/python_stdlib.zip", "application/zip"),
    ("/bundles/tiny-a/manifest.json", "application/json"),
    ("/bundles/tiny-a/model.onnx", "application/octet-stream"),
    ("/bundles/tiny-a/weights-000.qzb", "application/octet-stream"),
    ("/py/generate.py", "text/x-python; charset=utf-8"),
    ("/static/index.html", "text/html; charset=utf-8"),
    ("/static/empty.txt", "text/plain; charset=utf-8"),
])
def test_mime(client, url, mime):
    r = client.head(url)
    assert r.status_code == 200, url
    assert r.headers["content-type"] == mime


@pytest.mark.parametrize("url, cache", [
    ("/", "no-cache"), ("/static/app.js", "no-cache"), (BLOB_URL, "no-cache"), ("/py/generate.py", "no-cache"),
    ("/vendor/ort/ort.min.mjs", "public, max-age=31536000"),
    ("/vendor/pyodide/pyodide.mjs", "public, max-age=31536000"),
])
def test_cache_control(client, url, cache):
    assert client.head(url).headers["cache-control"] == cache


def test_symlink_inside_root_is_served(client):
    r = client.get("/static/inner.js")
    assert r.status_code == 200 and r.content == b"export const answer = 42;\n"


# ---------------------------------------------------------------------------------------------------------------
# Isolation headers and methods
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, url, headers, status", [
    ("GET", "/", {}, 200),
    ("GET", "/api/bundles", {}, 200),
    ("GET", BLOB_URL, {"Range": "bytes=0-1"}, 206),
    ("GET", BLOB_URL, {"Range": f"bytes={BLOB_SIZE}-"}, 416),
    ("GET", BLOB_URL, {"If-None-Match": "*"}, 304),
    ("HEAD", "/vendor/ort/ort.min.mjs", {}, 200),
    ("GET", "/nowhere", {}, 404),
    ("GET", "/static/missing.js", {}, 404),
    ("POST", "/api/bundles", {}, 405),
    ("OPTIONS", "/static/app.js", {}, 204),
])
def test_isolation_headers_everywhere(client, method, url, headers, status):
    r = client.request(method, url, headers=headers)
    assert r.status_code == status
    for name, value in ISOLATION.items():
        assert r.headers.get_list(name) == [value], name


def test_isolation_headers_on_500(tree):
    """ServerErrorMiddleware's own 500 page must carry them too (IsolationHeaders sits outside it)."""
    app = create_app(tree["bundles"], static_dir=tree["static"], node_modules=tree["node_modules"])

    async def boom(request):
        raise ValueError("boom")

    from starlette.routing import Route
    app.router.routes.append(Route("/boom", boom))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500
    assert all(r.headers[name] == value for name, value in ISOLATION.items())


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("url", ["/", "/api/bundles", "/static/app.js", BLOB_URL, "/vendor/ort/ort.min.mjs",
                                 "/py/generate.py"])
def test_other_methods_405(client, method, url):
    r = client.request(method, url)
    assert r.status_code == 405
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}


def test_options(client):
    r = client.options(BLOB_URL)
    assert r.status_code == 204 and r.headers["allow"] == "GET, HEAD, OPTIONS" and r.content == b""


# ---------------------------------------------------------------------------------------------------------------
# /py
# ---------------------------------------------------------------------------------------------------------------

def test_py_serves_runtime_source(client):
    r = client.get("/py/generate.py")
    assert r.status_code == 200
    assert r.content == (REPO / "converter" / "runtime" / "generate.py").read_bytes()


def test_bundles_are_flat_but_for_their_warm_up_model(client):
    """A bundle's files, and those of its warm-up model (converter/warmup_model.py, folder warmup/); nothing deeper
    and no other folder."""
    assert client.get("/bundles/tiny-a/warmup/model.onnx").content == b"warm-up graph"
    for url in ("/bundles/tiny-a/extra/model.onnx", "/bundles/tiny-a/warmup/x/model.onnx", "/bundles/warmup/x/y"):
        assert client.get(url).status_code == 404, url


@pytest.mark.parametrize("url", [
    "/py/", "/py/__pycache__", "/py/missing.py", "/py/generate", "/py/generate.pyc",
    "/py/__pycache__/generate.cpython-311.pyc",
    "/py/%2e%2e/bundle.py", "/py/..%2Fbundle.py", "/py/..%2F..%2FREADME.md", "/py/..%2F..%2Fweb%2Fapp.py",
])
def test_py_refuses_everything_else(client, url):
    assert client.get(url).status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# Traversal: against the real server, so that the path reaches the app exactly as uvicorn decodes it
# ---------------------------------------------------------------------------------------------------------------

TRAVERSALS = [
    "/static/../secret.txt",
    "/static/../../secret.txt",
    "/static/sub/../../secret.txt",
    "/static/%2e%2e/secret.txt",
    "/static/%2E%2E%2Fsecret.txt",
    "/static/sub/..%2F..%2Fsecret.txt",
    "/static/sub%2F..%2F..%2Fsecret.txt",
    "/static/..%5Csecret.txt",
    "/static/..\\secret.txt",
    "/static//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
    "/static/app.js%00.txt",
    "/static/%00",
    "/static/./app.js",
    "/static/leak.txt",                             # symlink to a file outside the root
    "/static/leakdir/secret2.txt",                  # symlink to a directory outside the root
    "/static/sub",                                  # a directory
    "/static/",
    "/bundles/../secret.txt",
    "/bundles/tiny-a/../../secret.txt",
    "/bundles/tiny-a/..%2F..%2Fsecret.txt",
    "/bundles/%2e%2e/secret.txt",
    "/bundles/linked/manifest.json",                # a bundle folder symlinked from outside
    "/bundles/.building/manifest.json",             # in-progress build
    "/bundles/stray.txt",                           # not {name}/{file}
    "/vendor/ort/../package.json",
    "/vendor/ort/..%2Fpackage.json",
    "/vendor/ort/..%2F..%2Fpyodide%2Fpyodide.mjs",  # another root, but still outside this one
    "/vendor/ort/../../../secret.txt",
    "/vendor/pyodide/..%2F..%2Fsecret.txt",
    "/py/../bundle.py",
    "/py/%2e%2e%2F%2e%2e%2FREADME.md",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_traversal_refused(server, tree, path):
    status, body = raw_get(server, path)
    assert status in (400, 404), (path, status)
    assert SECRET not in body and b"root:" not in body and b"export" not in body


def test_traversal_absolute_path(server, tree):
    secret = str(tree["root"] / "secret.txt")       # "/tmp/.../secret.txt": both as "//tmp/..." and encoded
    for path in (f"/static/{secret}", "/static/" + secret.replace("/", "%2F")):
        status, body = raw_get(server, path)
        assert status == 404 and SECRET not in body, path


@pytest.mark.parametrize("rel", [
    "", "/etc/passwd", "..", "../secret.txt", "a/../app.js", "./app.js", "sub//x.wasm", "sub/", "a\\b", "C:x",
    "app.js\x00", ".hidden", "leak.txt", "leakdir/secret2.txt", "sub", "missing",
])
def test_resolve_under_refuses(tree, rel):
    assert resolve_under(tree["static"], rel) is None


def test_resolve_under_accepts(tree):
    assert resolve_under(tree["static"], "sub/x.wasm") == (tree["static"] / "sub" / "x.wasm").resolve()
    assert resolve_under(tree["static"], "inner.js") == (tree["static"] / "app.js").resolve()


# ---------------------------------------------------------------------------------------------------------------
# The real server under load
# ---------------------------------------------------------------------------------------------------------------

def test_parallel_downloads(server, tree):
    url = f"http://{server[0]}:{server[1]}{BLOB_URL}"

    def download(i: int) -> bytes:
        req = urllib.request.Request(url)
        if i % 4 == 3:                                  # a quarter as range requests, for good measure
            req.add_header("Range", f"bytes={i * 1000}-")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == (206 if i % 4 == 3 else 200)
            assert resp.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            return resp.read()

    with ThreadPoolExecutor(max_workers=32) as pool:
        bodies = list(pool.map(download, range(100)))
    for i, body in enumerate(bodies):
        assert body == (tree["blob"][i * 1000:] if i % 4 == 3 else tree["blob"]), i


def test_real_server_head_and_range(server, tree):
    conn = http.client.HTTPConnection(*server, timeout=10)
    try:
        conn.request("HEAD", BLOB_URL)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"" and r.headers["Content-Length"] == str(BLOB_SIZE)
        conn.request("GET", BLOB_URL, headers={"Range": "bytes=262140-262150"})   # across the first chunk edge
        r = conn.getresponse()
        assert r.status == 206 and r.read() == tree["blob"][262140:262151]
    finally:
        conn.close()


def _open_fds_to(path: Path) -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd) == str(path)
        except OSError:
            pass
    return count


def test_client_disconnect_mid_download(server, tree):
    """A client that hangs up mid-file must not wedge the server, and the server must close the file."""
    for _ in range(5):
        with socket.create_connection(server, timeout=10) as s:
            s.sendall(f"GET {BLOB_URL} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
    status, body = raw_get(server, "/static/app.js")
    assert status == 200 and body == b"export const answer = 42;\n"
    if Path("/proc/self/fd").is_dir():                  # the server runs in this process
        blob = (tree["bundles"] / "tiny-a" / "weights-000.qzb").resolve()
        deadline = time.monotonic() + 10
        while _open_fds_to(blob):
            assert time.monotonic() < deadline, "blob still open after the clients went away"
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------
# python -m web
# ---------------------------------------------------------------------------------------------------------------

def test_describe():
    assert describe("127.0.0.1", 8000) == ["serving on http://127.0.0.1:8000 (loopback only; use --host 0.0.0.0 "
                                           "to expose)", "open http://127.0.0.1:8000/"]
    assert describe("::1", 8000)[1] == "open http://[::1]:8000/"
    assert describe("localhost", 8000)[0].startswith("serving on http://localhost:8000 (loopback only")
    wildcard = describe("0.0.0.0", 9000)
    assert wildcard[0].startswith("serving on http://0.0.0.0:9000 (all interfaces")
    assert wildcard[1].startswith("open http://localhost:9000/")
    assert "without threads" in describe("192.168.1.5", 8000)[1]


def test_cli_serves(tree):
    proc = subprocess.Popen([sys.executable, "-m", "web", "--port", "0", "--bundles", str(tree["bundles"])],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("bundles: ") and "(2 found)" in lines[0]
        m = re.fullmatch(r"serving on http://127\.0\.0\.1:(\d+) \(loopback only; use --host 0\.0\.0\.0 to expose\)\n",
                         lines[1])
        assert m, lines
        port = int(m.group(1))
        assert lines[2] == f"open http://127.0.0.1:{port}/\n"
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/bundles", timeout=5) as resp:
                    assert [b["name"] for b in json.load(resp)] == ["b-second", "tiny-a"]
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not answer"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
