"""(b)–(d) in Chromium: the page on the WASM EP and on WebGPU, and wllama, each in a freshly launched Debian
Chromium driven by Playwright (the e2e flags; never Playwright's own browser download), against the real dev
server.

A fresh browser per measurement, with a new profile directory of its own: a cold load is really cold (HTTP
cache, Cache API, V8 code cache, GPU process), and the process tree we sample for memory holds that measurement
alone. The page's reload is a user's return visit, so its profile is on disk, as a user's is: an incognito context
(Playwright's `browser.new_context()`) keeps no V8 code cache, and its return visit would compile onnxruntime-web's
wasm anew and pay the first reply's warm-up again (session 25: SmolLM2 int4-m32's first reply after a load decodes
at ~30 tok/s where the later ones run at ~34 — V8 compiles the hot wasm functions with its optimizing tier while
they run — and a return visit with the code cache starts at the later replies' speed).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent

# e2e/conftest.py's flags, plus eager measureUserAgentSpecificMemory (otherwise it waits for a GC, up to 20 s)
CHROMIUM_FLAGS = ["--enable-unsafe-webgpu", "--no-sandbox", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--enable-blink-features=ForceEagerMeasureMemory"]


def save_json(path: str | Path | None, doc) -> None:
    """A script's --out: the results as indented JSON (nothing when no path was given)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def skip_reason() -> str | None:
    """Why the browser part cannot run here, or None."""
    if not shutil.which("chromium"):
        return "Debian chromium is not installed (tools/setup.sh installs it)"
    for pkg in ("onnxruntime-web/dist", "pyodide", "@wllama/wllama/esm"):
        if not (ROOT / "node_modules" / pkg).is_dir():
            return f"node_modules/{pkg} is missing (npm ci)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright (PyPI) is not installed"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------------

class Server:
    """The dev server (web.app) on a free loopback port, in a thread of this process."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = bundle_dir

    def __enter__(self) -> str:
        import uvicorn

        from web.app import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(create_app(self.bundle_dir), host="127.0.0.1", port=port, log_level="warning")
        self.srv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.srv.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.srv.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.srv.should_exit = True
        self.thread.join(5)


# ---------------------------------------------------------------------------------------------------------------
# Memory of the Chromium process tree (/proc; PSS so that shared pages are counted once)
# ---------------------------------------------------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _kind(pid: int) -> str | None:
    """'browser' | 'renderer' | 'gpu' | 'utility' for Chromium processes; None for anything else."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().replace(b"\0", b" ").split()   # Chromium rewrites its title: one space-joined string
    except OSError:
        return None
    if not args or b"chrom" not in os.path.basename(args[0]):
        return None
    for a in args:
        if a.startswith(b"--type="):
            t = a[7:].decode()
            return {"gpu-process": "gpu", "renderer": "renderer"}.get(t, "utility")
    return "browser"


@dataclass
class MemorySampler:
    """Samples the PSS of every Chromium process below this Python process every `period` s, in a thread."""
    period: float = 0.25
    samples: list[dict] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)

    def __enter__(self) -> "MemorySampler":
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def mark(self, label: str) -> None:
        self.marks.append((time.perf_counter() - self.t0, label))

    def sample(self) -> dict:
        by_kind = {"browser": 0, "renderer": 0, "gpu": 0, "utility": 0}
        for pid in _descendants(os.getpid()):
            k = _kind(pid)
            if k is not None:
                by_kind[k] += _pss_kib(pid)
        s = {k: v / 1024 for k, v in by_kind.items()}
        s["total"] = sum(s.values())
        s["t"] = time.perf_counter() - self.t0
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.period)

    def peak(self, after: float = 0.0) -> float:
        vals = [s["total"] for s in self.samples if s["t"] >= after]
        return max(vals) if vals else 0.0

    def baseline(self, before: float) -> float:
        vals = [s["total"] for s in self.samples if s["t"] <= before]
        return vals[-1] if vals else 0.0


# ---------------------------------------------------------------------------------------------------------------
# In-page measurements
# ---------------------------------------------------------------------------------------------------------------

# whole-page memory where the browser offers it (crossOriginIsolated), plus the wasm heaps we can reach. pageMemory
# is the UA memory API's total plus Pyodide's heap: Chromium's API counts ArrayBuffers, SharedArrayBuffers and a
# shared WebAssembly.Memory (onnxruntime-web's heap) but not a non-shared one (Pyodide's), measured in
# bench/ua_memory_wasm.py
PAGE_MEMORY_JS = """async () => {
  const out = { crossOriginIsolated: self.crossOriginIsolated, hardwareConcurrency: navigator.hardwareConcurrency };
  if (performance.memory) out.jsHeapUsed = performance.memory.usedJSHeapSize;
  const py = window.tinyqmoe && window.tinyqmoe.state.py;
  if (py) out.pyodideHeap = await py.heapBytes();
  if (window.tinyqmoe && window.tinyqmoe.ortHeapBytes) out.ortHeap = await window.tinyqmoe.ortHeapBytes();
  if (window.tinyqmoe) { out.weightBytes = window.tinyqmoe.state?.weightBytes; out.heapReserved = window.tinyqmoe.state?.heapReserved; }
  if (self.crossOriginIsolated && performance.measureUserAgentSpecificMemory) {
    try {
      const m = await Promise.race([performance.measureUserAgentSpecificMemory(),
                                    new Promise((_, rej) => setTimeout(() => rej(new Error("timeout")), 30000))]);
      out.uaMemory = m.bytes;
      const byType = {};
      for (const b of m.breakdown) for (const t of b.types) byType[t] = (byType[t] || 0) + b.bytes / b.types.length;
      out.uaMemoryByType = byType;
      const byScope = {};           // where the bytes live: the page itself or one of its workers
      for (const b of m.breakdown) {
        const a = b.attribution[0];
        const k = a ? (a.scope || "?") + (a.url && a.scope !== "Window" ? " " + a.url.split("/").pop() : "") : "unattributed";
        byScope[k] = (byScope[k] || 0) + b.bytes;
      }
      out.uaMemoryByScope = byScope;
      // the API leaves out a non-shared WebAssembly.Memory (bench/ua_memory_wasm.py): Pyodide's heap is added
      out.pageMemory = m.bytes + (out.pyodideHeap || 0);
    } catch (e) { out.uaMemoryError = String(e); }
  }
  return out;
}"""


def _launch(pw):
    return pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS, headless=True)


def _launch_profile(pw, profile_dir: str):
    """A fresh browser on an on-disk profile (profile_dir, empty): what a user's return visit finds there — HTTP
    cache, Cache API and V8's code cache — survives a reload. Returns its one context (close() ends the browser)."""
    return pw.chromium.launch_persistent_context(profile_dir, executable_path=shutil.which("chromium"),
                                                 args=CHROMIUM_FLAGS, headless=True)


def _wait_ready(page, timeout_ms: int) -> None:
    page.wait_for_function("document.body.dataset.ready", timeout=timeout_ms)
    if page.evaluate("document.body.dataset.ready") != "1":
        raise RuntimeError(f"page failed to load: {page.inner_text('#error')}")


def run_page(server: str, bundle: str, ep: str, threads: int, prompt: str, new_tokens: int,
             kv: str | None = None, yield_mode: str | None = None, warm: bool = True,
             timeout_ms: int = 600_000, extra: dict | None = None) -> dict:
    """Cold load (fresh browser, empty profile) -> generate `new_tokens` -> memory -> the same again (the next
    reply) -> reload (warm, a return visit: Cache API, HTTP cache and V8's code cache) -> generate `new_tokens`
    (its first token gives the warm time to first token). Returns the page's own timings plus the memory timeline
    of the Chromium processes."""
    import tempfile

    from playwright.sync_api import sync_playwright

    q = {"bundle": bundle, "ep": ep, "autoload": "1"}
    if threads:
        q["threads"] = str(threads)
    if kv:
        q["kv"] = kv
    if yield_mode:
        q["yield"] = yield_mode
    q.update(extra or {})                       # any other page parameter, e.g. {"ort": "webgpu"}
    url = f"{server}/?{urlencode(q)}"
    gen_js = ("([p, n]) => window.tinyqmoe.generate(p, {raw: p, max_new_tokens: n, ignore_eos: true})"
              ".then(r => ({...r, ep: window.tinyqmoe.state.ep}))")
    result: dict = {"bundle": bundle, "ep_requested": ep, "threads_requested": threads, "kv": kv or "default",
                    "yield": yield_mode or "default"}
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as profile, sync_playwright() as pw, \
            MemorySampler() as mem:
        browser = _launch_profile(pw, profile)
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.goto("about:blank")
            time.sleep(0.6)
            mem.mark("navigate")
            page.goto(url)
            _wait_ready(page, timeout_ms)
            mem.mark("ready")
            result["cold"] = page.evaluate("window.tinyqmoe.state.loadTimings")
            mem.mark("generate")
            g = page.evaluate(gen_js, [prompt, new_tokens])
            mem.mark("generated")
            result["generate"] = g
            result["ep"] = g.pop("ep")
            result["ort_build"] = page.evaluate("window.tinyqmoe.state.ortBuild")
            result["page_memory"] = page.evaluate(PAGE_MEMORY_JS)
            result["threads"] = page.evaluate("window.tinyqmoe.state.numThreads")   # what onnxruntime-web runs with
            # the same completion again: the page's replies after the first one of a load are faster (session 24,
            # bench/later_replies.py); after the memory figures, which stay those of the first reply
            result["generate_again"] = page.evaluate(gen_js, [prompt, new_tokens])
            result["generate_again"].pop("ep")
            if warm:
                mem.mark("reload")
                page.reload()
                _wait_ready(page, timeout_ms)
                mem.mark("ready (warm)")
                result["warm"] = page.evaluate("window.tinyqmoe.state.loadTimings")
                result["warm_generate"] = page.evaluate(gen_js, [prompt, new_tokens])
                result["warm_generate"].pop("ep")
            result["console_tail"] = console[-10:]
        finally:
            browser.close()
    nav = next(t for t, label in mem.marks if label == "navigate")
    ready = next(t for t, label in mem.marks if label == "ready")
    gen_done = next(t for t, label in mem.marks if label == "generated")
    result["memory"] = {
        "idle_mib": mem.baseline(nav),
        "peak_load_mib": max([s["total"] for s in mem.samples if nav <= s["t"] <= ready] or [0]),
        "peak_mib": max([s["total"] for s in mem.samples if nav <= s["t"] <= gen_done] or [0]),
        "timeline": [dict(s, t=s["t"] - nav) for s in mem.samples if s["t"] <= gen_done + 0.5],
        "marks": [(t - nav, label) for t, label in mem.marks],
    }
    return result


def run_wllama(server: str, gguf_url: str, threads: int, gpu_layers: int, prompt: str, new_tokens: int,
               ban_tokens: list[int] = (), timeout_ms: int = 600_000) -> dict:
    """wllama on the bench page: fetch the GGUF, load it, one greedy completion of `new_tokens` (eos ignored), the
    same again (the next reply), then a return visit as the page's (reload, load, the completion)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    result: dict = {"threads_requested": threads, "gpu_layers": gpu_layers}
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as profile, sync_playwright() as pw, \
            MemorySampler() as mem:
        browser = _launch_profile(pw, profile)
        try:
            page = browser.pages[0] if browser.pages else browser.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(m.text))
            page.goto("about:blank")
            time.sleep(0.6)
            mem.mark("navigate")
            page.goto(f"{server}/static/bench/wllama.html")
            page.wait_for_function("window.wbench && window.wbench.ready", timeout=60_000)
            page.set_default_timeout(timeout_ms)
            result["load"] = page.evaluate("([u, o]) => wbench.load(u, o)",
                                           [gguf_url, {"threads": threads, "gpuLayers": gpu_layers}])
            mem.mark("ready")
            complete = ("([p, n, ban]) => wbench.complete(p, n, ban)", [prompt, new_tokens, list(ban_tokens)])
            result["generate"] = page.evaluate(*complete)
            mem.mark("generated")
            result["page_memory"] = page.evaluate(PAGE_MEMORY_JS)
            result["generate_again"] = page.evaluate(*complete)
            page.reload()
            page.wait_for_function("window.wbench && window.wbench.ready", timeout=60_000)
            result["load_return"] = page.evaluate("([u, o]) => wbench.load(u, o)",
                                                  [gguf_url, {"threads": threads, "gpuLayers": gpu_layers}])
            result["generate_return"] = page.evaluate(*complete)
            result["threads"] = result["load"]["threads"]
            result["console_tail"] = console[-10:]
        finally:
            browser.close()
    nav = next(t for t, label in mem.marks if label == "navigate")
    gen_done = next(t for t, label in mem.marks if label == "generated")
    result["memory"] = {"idle_mib": mem.baseline(nav),
                        "peak_mib": max([s["total"] for s in mem.samples if nav <= s["t"] <= gen_done] or [0])}
    return result


def chromium_version() -> str:
    import subprocess

    try:
        return subprocess.run([shutil.which("chromium") or "chromium", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
