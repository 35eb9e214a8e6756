"""The development server as one Starlette app: the page, its vendor libraries, the runtime's Python source and
the bundles, every response crossOriginIsolated.

    GET  /                          static/index.html
    GET  /sw.js                     static/sw.js (the page's opt-in offline copy; its scope is the whole site)
    GET  /static/{path}             files under static_dir
    GET  /api/bundles               JSON list of the bundles in bundle_dir (see list_bundles)
    GET  /bundles/{name}/{file}     the files of one bundle folder
    GET  /vendor/ort/{path}         node_modules/onnxruntime-web/dist
    GET  /vendor/pyodide/{path}     node_modules/pyodide
    GET  /vendor/wllama/{path}      node_modules/@wllama/wllama/esm (llama.cpp in WASM; only the bench page uses it)
    GET  /py/{file}.py              converter/runtime/*.py, so Pyodide runs the same source as CPython

Files are served by our own small endpoint rather than StaticFiles, because we need all of these at once and want
each one visible in a few lines:
  * paths are checked segment by segment and the real path must stay inside the real root (resolve_under);
  * HEAD; one byte range per request (206 / 416); several ranges are answered with the whole file (200), which
    RFC 9110 allows and which every client that asks for ranges also accepts;
  * a strong ETag from size and mtime, If-None-Match → 304, If-Range;
  * explicit MIME types (the page loads ES modules and WASM under X-Content-Type-Options: nosniff, so a guess from
    the host's mime.types is not good enough);
  * Cache-Control: bundle files keep their names across rebuilds (weights-000.qzb), so they — like the page and
    the Python source — are "no-cache": the browser may keep them but must revalidate with the ETag, which costs
    one 304 per file. /vendor gets a long max-age: it changes only when node_modules is upgraded (then reload
    with the cache disabled). Nothing is "immutable", because no name here is content addressed.
No compression: it would break byte ranges, and the blobs are already LZW-compressed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from email.utils import formatdate
from pathlib import Path
from typing import Any, BinaryIO, Callable

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RUNTIME_DIR = REPO / "converter" / "runtime"      # the pure-Python runtime the page runs in Pyodide

# converter.bundle.FORMAT_NAME, written out so that the server does not import numpy and onnx (a test checks it)
BUNDLE_FORMAT = "tiny-qmoe-bundle"

# ---------------------------------------------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------------------------------------------

# On every response, errors included. COOP + COEP make the page crossOriginIsolated, which SharedArrayBuffer and
# therefore onnxruntime-web's threads need; CORP lets the page embed our own files under COEP and nobody else's
# page embed them; nosniff makes the browser trust the Content-Type below.
ISOLATION_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-embedder-policy", b"require-corp"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
)

NO_CACHE = "no-cache"                           # may be stored, must be revalidated (ETag) before each use
VENDOR_CACHE = "public, max-age=31536000"       # a year; see the module docstring
LISTING_CACHE = "no-store"                      # /api/bundles changes whenever a build finishes

ALLOW = "GET, HEAD, OPTIONS"
METHODS = ["GET", "HEAD", "OPTIONS"]

MIME_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".py": "text/x-python; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",                 # source maps
    ".wasm": "application/wasm",                # required for WebAssembly.instantiateStreaming
    ".onnx": "application/octet-stream",
    ".qzb": "application/octet-stream",         # LZW-compressed weight blobs
    ".qz": "application/octet-stream",          # a graph, tokenizer or tables file stored as QZ chunks
    ".zlib": "application/octet-stream",        # ... or as a zlib stream (format version 3; no Content-Encoding)
    ".zip": "application/zip",                  # pyodide's python_stdlib.zip
    ".whl": "application/zip",
    ".tar": "application/x-tar",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
DEFAULT_MIME = "application/octet-stream"


def content_type(path: Path) -> str:
    return MIME_TYPES.get(path.suffix.lower(), DEFAULT_MIME)


class IsolationHeaders:
    """ASGI middleware: sets ISOLATION_HEADERS on every HTTP response, replacing any the app set itself."""

    _names = {name for name, _ in ISOLATION_HEADERS}

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_isolated(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self._names]
                message = {**message, "headers": headers + list(ISOLATION_HEADERS)}
            await send(message)

        await self.app(scope, receive, send_isolated)


class _IsolatedStarlette(Starlette):
    """Starlette with IsolationHeaders outside its whole middleware stack, so that the 500 page written by
    ServerErrorMiddleware (the outermost layer Starlette builds) carries the headers too."""

    def build_middleware_stack(self) -> ASGIApp:
        return IsolationHeaders(super().build_middleware_stack())


# ---------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------

def resolve_under(root: Path, rel: str) -> Path | None:
    """The real path of the regular file that `rel` names under `root`, or None when there is none or it is refused.

    `rel` is the URL path after the route prefix, already percent-decoded by the server (so "%2e%2e" arrives as
    ".." and "%2F" as "/"). Refused before touching the disk: empty, absolute, backslashes and ":" (separators
    and drive letters on Windows), NUL, and any empty, "." or ".." segment or segment starting with "." (hidden
    files, and bundle folders still being built). Symlinks are followed, but the real path must lie inside the
    real root, and must be a regular file (no directory listings)."""
    if not rel or rel.startswith("/") or any(c in rel for c in ("\\", ":", "\x00")):
        return None
    if any(part == "" or part.startswith(".") for part in rel.split("/")):
        return None
    try:
        real_root = root.resolve(strict=True)
        real = (real_root / rel).resolve(strict=True)
    except (OSError, RuntimeError):             # missing, permission, symlink loop
        return None
    if not real.is_relative_to(real_root) or not real.is_file():
        return None
    return real


# ---------------------------------------------------------------------------------------------------------------
# Conditional and range requests
# ---------------------------------------------------------------------------------------------------------------

class RangeNotSatisfiable(Exception):
    pass


# one range only; at most 19 digits so that int() stays cheap (and below 2**63)
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.ASCII | re.IGNORECASE)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The half-open byte span [start, stop) that a Range header asks of a file of `size` bytes.

    None means "ignore the header and send the whole file": several ranges, another unit, or a malformed or
    backwards range (RFC 9110 §14.2 lets a server ignore Range; ignoring invalid ones is required). Raises
    RangeNotSatisfiable when the single range starts at or past the end, or is an empty suffix ("bytes=-0")."""
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    first, last = m.groups()
    if first == "":                             # "bytes=-N": the last N bytes
        if last == "":
            return None
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - n, 0), size
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    stop = size if last == "" else min(int(last) + 1, size)
    return start, stop


def etag_matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/"x" matches "x"; "*" matches any existing file."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def if_range_allows(if_range: str | None, etag: str, last_modified: str) -> bool:
    """Whether to honour Range: always without If-Range, else only if the client's copy is still ours (strong
    comparison; a date must equal our Last-Modified exactly). Otherwise the client gets the whole new file."""
    if if_range is None:
        return True
    return if_range.strip() in (etag, last_modified)


# ---------------------------------------------------------------------------------------------------------------
# File responses
# ---------------------------------------------------------------------------------------------------------------

def _read_at(file: BinaryIO, offset: int, n: int) -> bytes:
    file.seek(offset)
    return file.read(n)


class FileSliceResponse(Response):
    """Bytes [start, stop) of an already open file, read off the event loop in chunks. Owns the file and closes
    it when done, also when the client goes away mid-transfer (then it stops reading instead of draining)."""

    chunk_size = 256 * 1024

    def __init__(self, file: BinaryIO, start: int, stop: int, status_code: int, headers: dict[str, str],
                 send_body: bool) -> None:
        self.file, self.start, self.stop, self.send_body = file, start, stop, send_body
        self.status_code = status_code
        self.background = None
        self.init_headers(headers)              # headers carry Content-Length and Content-Type already

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if not self.send_body:
                await send({"type": "http.response.body", "body": b""})
                return
            # ASGI 2.3 servers (uvicorn) drop writes to a closed connection silently, so watch for the disconnect
            async with anyio.create_task_group() as tg:
                async def stream_then_stop() -> None:
                    await self._stream(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.file.close()

    async def _stream(self, send: Send) -> None:
        pos = self.start
        while pos < self.stop:
            chunk = await anyio.to_thread.run_sync(_read_at, self.file, pos, min(self.chunk_size, self.stop - pos))
            if not chunk:
                raise RuntimeError(f"{self.file.name} shrank while being served (at byte {pos} of {self.stop})")
            pos += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": pos < self.stop})
        if self.start == self.stop:             # an empty file still needs its (empty) body message
            await send({"type": "http.response.body", "body": b""})


async def serve_file(request: Request, path: Path | None, cache_control: str) -> Response:
    """GET / HEAD of one file with ETag, If-None-Match, Range and If-Range. `path` comes from resolve_under;
    None is a 404. Headers are computed from fstat of the opened file, so they describe the bytes we send even if
    the file is replaced meanwhile."""
    if path is None:
        raise HTTPException(status_code=404)
    try:
        file = await anyio.to_thread.run_sync(open, path, "rb")
    except OSError:
        raise HTTPException(status_code=404) from None
    try:
        st = os.fstat(file.fileno())
        size = st.st_size
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        last_modified = formatdate(st.st_mtime, usegmt=True)
        headers = {"ETag": etag, "Last-Modified": last_modified, "Cache-Control": cache_control}

        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)

        start, stop, status = 0, size, 200
        range_header = request.headers.get("range")
        if range_header is not None and if_range_allows(request.headers.get("if-range"), etag, last_modified):
            try:
                span = parse_range(range_header, size)
            except RangeNotSatisfiable:
                return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
            if span is not None:
                start, stop = span
                status = 206
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"

        headers |= {"Content-Type": content_type(path), "Content-Length": str(stop - start), "Accept-Ranges": "bytes"}
        response = FileSliceResponse(file, start, stop, status, headers, send_body=request.method != "HEAD")
        file = None                             # the response owns it now
        return response
    finally:
        if file is not None:
            file.close()


def options_response() -> Response:
    return Response(status_code=204, headers={"Allow": ALLOW})


def file_endpoint(root: Path, cache_control: str, accept: Callable[[str], bool] = lambda rel: True):
    """An endpoint serving {path} under `root`; `accept` narrows which relative paths a route may ask for."""

    async def endpoint(request: Request) -> Response:
        if request.method == "OPTIONS":
            return options_response()
        rel = request.path_params["path"]
        return await serve_file(request, resolve_under(root, rel) if accept(rel) else None, cache_control)

    return endpoint


def _is_bundle_file(rel: str) -> bool:
    # "{name}/{file}", and "{name}/warmup/{file}": a bundle's files and its warm-up model's (converter/warmup_model.py)
    parts = rel.split("/")
    return len(parts) == 2 or (len(parts) == 3 and parts[1] == "warmup")


def _is_runtime_source(rel: str) -> bool:
    return "/" not in rel and rel.endswith(".py")


# ---------------------------------------------------------------------------------------------------------------
# Bundle listing
# ---------------------------------------------------------------------------------------------------------------

def bundle_entry(name: str, manifest_path: Path) -> dict[str, Any] | None:
    """The listing entry for one bundle folder, or None (logged) when its manifest is unreadable or not ours."""
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError, RecursionError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        log.warning("skipping bundle %r: cannot read %s: %s", name, manifest_path, e)
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        log.warning("skipping bundle %r: %s is not a %s manifest", name, manifest_path, BUNDLE_FORMAT)
        return None
    try:
        totals = manifest["totals"]
        return {
            "name": name,
            "scheme": manifest["scheme"],
            "embed_scheme": manifest["embed_scheme"],
            "bytes": totals["bundle_bytes"],
            "parameters": totals["parameters"],
            "bits_per_weight": totals["bits_per_weight_all_in"],
            "version": manifest["version"],
            "manifest_sha256": hashlib.sha256(raw).hexdigest(),     # the page's cache key
        }
    except (KeyError, TypeError) as e:
        log.warning("skipping bundle %r: %s lacks %s", name, manifest_path, e)
        return None


def list_bundles(bundle_dir: Path) -> list[dict[str, Any]]:
    """Every folder of bundle_dir holding a tiny-qmoe-bundle manifest.json, sorted by name. Folders starting with
    "." (builds in progress) and folders whose manifest resolve_under refuses (so /bundles could not serve them,
    e.g. symlinks out of bundle_dir) are left out silently."""
    if not bundle_dir.is_dir():
        return []
    entries = []
    for folder in sorted(bundle_dir.iterdir(), key=lambda p: p.name):
        manifest_path = resolve_under(bundle_dir, f"{folder.name}/manifest.json")
        if manifest_path is None:
            continue
        entry = bundle_entry(folder.name, manifest_path)
        if entry is not None:
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------------------------

def create_app(bundle_dir: Path, static_dir: Path | None = None, node_modules: Path | None = None) -> Starlette:
    """The dev server app. Roots are resolved per request, so folders created after start-up are served too."""
    bundle_dir = Path(bundle_dir)
    static_dir = Path(static_dir) if static_dir is not None else REPO / "static"
    node_modules = Path(node_modules) if node_modules is not None else REPO / "node_modules"

    async def index(request: Request) -> Response:
        if request.method == "OPTIONS":
            return options_response()
        return await serve_file(request, resolve_under(static_dir, "index.html"), NO_CACHE)

    async def service_worker(request: Request) -> Response:
        """static/sw.js at the site's root, so that its scope is the whole site (the page's offline copy)."""
        if request.method == "OPTIONS":
            return options_response()
        return await serve_file(request, resolve_under(static_dir, "sw.js"), NO_CACHE)

    async def bundles(request: Request) -> Response:
        if request.method == "OPTIONS":
            return options_response()
        entries = await anyio.to_thread.run_sync(list_bundles, bundle_dir)
        return JSONResponse(entries, headers={"Cache-Control": LISTING_CACHE})

    routes = [
        Route("/", index, methods=METHODS),
        Route("/api/bundles", bundles, methods=METHODS),
        Route("/sw.js", service_worker, methods=METHODS),
        Route("/static/{path:path}", file_endpoint(static_dir, NO_CACHE), methods=METHODS),
        Route("/bundles/{path:path}", file_endpoint(bundle_dir, NO_CACHE, _is_bundle_file), methods=METHODS),
        Route("/vendor/ort/{path:path}",
              file_endpoint(node_modules / "onnxruntime-web" / "dist", VENDOR_CACHE), methods=METHODS),
        Route("/vendor/pyodide/{path:path}", file_endpoint(node_modules / "pyodide", VENDOR_CACHE), methods=METHODS),
        Route("/vendor/wllama/{path:path}",
              file_endpoint(node_modules / "@wllama" / "wllama" / "esm", VENDOR_CACHE), methods=METHODS),
        Route("/py/{path:path}", file_endpoint(RUNTIME_DIR, NO_CACHE, _is_runtime_source), methods=METHODS),
    ]
    return _IsolatedStarlette(routes=routes)
