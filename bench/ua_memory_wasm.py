"""What `performance.measureUserAgentSpecificMemory()` counts: a fresh Chromium per case on the dev server's page
(cross-origin isolated), 100 MiB allocated one way and written, the API asked before and after. Chromium counts an
ArrayBuffer, a SharedArrayBuffer and a shared WebAssembly.Memory (onnxruntime-web's heap) and leaves out a
non-shared WebAssembly.Memory (Pyodide's heap), so the bench's page memory adds Pyodide's heap to the API's total
(bench/browser.py PAGE_MEMORY_JS).

    python bench/ua_memory_wasm.py [--mib 200] [--reps 3] [--case NAME ...] [--out bench/results/session28/ua_memory_wasm.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import Server, _launch, save_json, skip_reason  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
CASES = {   # how the bytes are made; each is written (filled) unless the name says "unwritten"
    "nothing (the control)": "",
    "ArrayBuffer": "self.__keep = new Uint8Array(N); self.__keep.fill(1);",
    "ArrayBuffer, unwritten": "self.__keep = new Uint8Array(N);",
    "SharedArrayBuffer": "self.__keep = new Uint8Array(new SharedArrayBuffer(N)); self.__keep.fill(1);",
    "WebAssembly.Memory, shared": "const m = new WebAssembly.Memory({initial: N / 65536, maximum: 65536, "
                                  "shared: true}); self.__keep = m; new Uint8Array(m.buffer).fill(1);",
    "WebAssembly.Memory, shared, unwritten": "self.__keep = new WebAssembly.Memory({initial: N / 65536, "
                                             "maximum: 65536, shared: true});",
    "WebAssembly.Memory, shared, a view, unwritten": "const m = new WebAssembly.Memory({initial: N / 65536, "
                                                     "maximum: 65536, shared: true}); self.__keep = m; "
                                                     "self.__view = new Uint8Array(m.buffer);",
    "WebAssembly.Memory, shared, grown, a view, unwritten": "const m = new WebAssembly.Memory({initial: 16, "
                                                            "maximum: 65536, shared: true}); m.grow(N / 65536); "
                                                            "self.__keep = m; self.__view = new Uint8Array(m.buffer);",
    "WebAssembly.Memory": "const m = new WebAssembly.Memory({initial: N / 65536}); self.__keep = m; "
                          "new Uint8Array(m.buffer).fill(1);",
    "WebAssembly.Memory, grown": "const m = new WebAssembly.Memory({initial: 16, maximum: 65536}); "
                                 "m.grow(N / 65536); self.__keep = m; new Uint8Array(m.buffer).fill(1);",
}
JS = """async ([make, n]) => {
  const N = n;
  await performance.measureUserAgentSpecificMemory();        // the first answer comes while the page settles
  await new Promise((r) => setTimeout(r, 500));
  const before = (await performance.measureUserAgentSpecificMemory()).bytes;
  (new Function("N", make))(N);
  const after = (await performance.measureUserAgentSpecificMemory()).bytes;
  return { crossOriginIsolated: self.crossOriginIsolated, before, after };
}"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=200, help="bytes allocated per case, MiB (a multiple of 1)")
    ap.add_argument("--reps", type=int, default=3, help="fresh browsers per case (the API's answer is noisy)")
    ap.add_argument("--case", action="append", choices=list(CASES), help="only this case (repeatable)")
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    from playwright.sync_api import sync_playwright

    results = []
    with Server(ROOT / "bundles") as server, sync_playwright() as pw:
        for name, make in CASES.items():
            if args.case and name not in args.case:
                continue
            counted = []
            for _ in range(args.reps):
                browser = _launch(pw)
                try:
                    page = browser.new_page()
                    page.goto(f"{server}/?autoload=0")
                    r = page.evaluate(JS, [make, args.mib * MIB])
                finally:
                    browser.close()
                counted.append(round((r["after"] - r["before"]) / MIB, 1))
            results.append({"case": name, "allocated_mib": args.mib, "counted_mib": counted,
                            "median_mib": statistics.median(counted),
                            "cross_origin_isolated": r["crossOriginIsolated"]})
            print(f"{name:52s} {args.mib} MiB allocated, the API counts {statistics.median(counted):6.1f} MiB more "
                  f"(median; {', '.join(map(str, counted))})", flush=True)
    save_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
