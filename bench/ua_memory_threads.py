"""Why the page memory (the UA memory API) has no number at 2 threads: asks `performance.measureUserAgentSpecificMemory()`
before onnxruntime-web has started (page open, nothing loaded) and after a bundle is loaded, at 1 and at 2 threads,
each in a fresh Chromium, and prints whether and how fast it answered.

    python bench/ua_memory_threads.py [--bundle smollm2-int4-m32] [--threads 1,2] [--timeout-ms 15000]

Session 27 (docs/page-bench.md): at 1 thread it answers before and after the load (~0.1 s); at 2 threads it answers
before the load and never after it. Measurement only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import Server, _launch, _wait_ready, skip_reason  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASK = """async (ms) => {
  const t0 = performance.now();
  try {
    const m = await Promise.race([performance.measureUserAgentSpecificMemory(),
                                  new Promise((_, rej) => setTimeout(() => rej(new Error("no answer")), ms))]);
    return { mib: m.bytes / 1048576, ms: performance.now() - t0, parts: m.breakdown.length };
  } catch (e) { return { error: String(e.message || e), ms: performance.now() - t0 }; }
}"""


def ask(pw, url: str, loaded: bool, timeout_ms: int) -> dict:
    browser = _launch(pw)
    try:
        page = browser.new_context().new_page()
        page.goto(url + ("&autoload=1" if loaded else ""))
        if loaded:
            _wait_ready(page, 600_000)
        else:
            time.sleep(3)                      # the page's own start (Pyodide, decoders), no onnxruntime-web yet
        return page.evaluate(ASK, timeout_ms)
    finally:
        browser.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="smollm2-int4-m32")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--timeout-ms", type=int, default=15000)
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    from playwright.sync_api import sync_playwright

    with Server(Path(args.bundles)) as server, sync_playwright() as pw:
        for threads in (int(t) for t in args.threads.split(",")):
            url = f"{server}/?bundle={args.bundle}&ep=wasm&threads={threads}&warmup=0"
            for loaded in (False, True):
                r = ask(pw, url, loaded, args.timeout_ms)
                what = f"{r['mib']:.1f} MiB in {r['ms']:.0f} ms" if "mib" in r else f"{r['error']} after {r['ms']:.0f} ms"
                print(f"{threads} thread(s), {'after the load' if loaded else 'before the load'}: {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
