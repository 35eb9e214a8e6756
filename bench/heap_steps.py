"""onnxruntime-web's wasm heap in the page: every growth while a bundle loads and then generates, the heap the page
reserved for it, the page memory (the UA memory API's total plus Pyodide's heap, which the API leaves out:
bench/ua_memory_wasm.py) and its ratio to the weights — one fresh Chromium per configuration.
With --high-water LO:HI, instead binary-searches the smallest heap (MiB, grown as onnxruntime-web makes it) under
which loading and generating never grow it: what the session really needs. Measurement only: both hook
WebAssembly.Memory in the page (docs/page-bench.md, session 18).

    python bench/heap_steps.py smollm2-int4-m32 "smollm2-int4-m32?heap=0" smollm2-int8
    python bench/heap_steps.py --high-water 140:160 smollm2-int4-m32      (runs it with ?heap=0)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import PAGE_MEMORY_JS, Server, _launch, _wait_ready, save_json, skip_reason  # noqa: E402
from bench.page_ab import PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
# every growth of a shared memory (onnxruntime-web's heap; Pyodide's is not shared), as [size before, after]; with
# PREGROW > 0 the heap is grown to PREGROW bytes as it is made (the glue's `new WebAssembly.Memory({initial: 256})`)
HOOK = """
(() => { const M = WebAssembly.Memory, grow = M.prototype.grow, PREGROW = %d; self.__heapSteps = [];
  M.prototype.grow = function (pages) { const before = this.buffer.byteLength, out = grow.call(this, pages);
    if (this.buffer instanceof SharedArrayBuffer && before >= 16 << 20)
      self.__heapSteps.push([before, this.buffer.byteLength]);
    return out; };
  if (PREGROW) {
    WebAssembly.Memory = function (d) { const m = new M(d);
      if (d.shared && d.initial === 256) grow.call(m, PREGROW / 65536 - 256); return m; };
    WebAssembly.Memory.prototype = M.prototype;
  } })();
"""


def run(pw, server: str, spec: str, tokens: int, pregrow_mib: float = 0) -> dict:
    bundle, _, query = spec.partition("?")
    browser = _launch(pw)
    try:
        ctx = browser.new_context()
        ctx.add_init_script(HOOK % (int(pregrow_mib * 16) * 65536))
        page = ctx.new_page()
        page.goto(f"{server}/?bundle={bundle}&ep=wasm&threads=1&autoload=1&{query}")
        _wait_ready(page, 900_000)
        at_load = page.evaluate("self.__heapSteps.length")
        gen = page.evaluate("([p, n]) => window.tinyqmoe.generate(p, {raw: p, max_new_tokens: n, ignore_eos: true})",
                            [PROMPT, tokens])
        steps = page.evaluate("self.__heapSteps")
        pm = page.evaluate(PAGE_MEMORY_JS)
        return {"config": spec, "steps_loading": steps[:at_load], "steps_generating": steps[at_load:],
                "ort_heap_mib": (pm.get("ortHeap") or 0) / MIB, "weights_mib": (pm.get("weightBytes") or 0) / MIB,
                "reserved_mib": (pm.get("heapReserved") or 0) / MIB, "ua_memory_mib": pm.get("uaMemory", 0) / MIB,
                "ua_over_weights": pm.get("uaMemory", 0) / max(pm.get("weightBytes") or 1, 1),
                "pyodide_heap_mib": (pm.get("pyodideHeap") or 0) / MIB,
                "page_memory_mib": pm.get("pageMemory", 0) / MIB,
                "page_over_weights": pm.get("pageMemory", 0) / max(pm.get("weightBytes") or 1, 1),
                "decode_tok_s": gen.get("decodeTokS"),
                "ua_memory_by_scope": pm.get("uaMemoryByScope"), "ua_memory_by_type": pm.get("uaMemoryByType")}
    finally:
        browser.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="bundle[?page params], e.g. smollm2-int8?heap=0")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--high-water", metavar="LO:HI", help="binary-search the heap's high-water mark in MiB")
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    from playwright.sync_api import sync_playwright

    results = []
    with Server(Path(args.bundles)) as server, sync_playwright() as pw:
        for spec in args.configs:
            if args.high_water:
                lo, hi = (float(x) for x in args.high_water.split(":"))
                spec += ("&" if "?" in spec else "?") + "heap=0"     # the page's own reservation off
                r = run(pw, server, spec, args.new_tokens, hi)
                if r["steps_loading"] or r["steps_generating"]:
                    print(f"{spec}: {hi} MiB is not enough; raise HI")
                    continue
                while hi - lo > 0.5:
                    mid = round((lo + hi) / 2, 2)
                    r = run(pw, server, spec, args.new_tokens, mid)
                    grew = bool(r["steps_loading"] or r["steps_generating"])
                    print(f"  {spec}: {mid} MiB {'grew' if grew else 'enough'}", flush=True)
                    lo, hi = (mid, hi) if grew else (lo, mid)
                results.append({"config": spec, "high_water_mib": [lo, hi]})
                print(f"{spec}: high-water mark between {lo} and {hi} MiB", flush=True)
                continue
            r = run(pw, server, spec, args.new_tokens)
            results.append(r)
            fmt = lambda steps: ", ".join(f"{a / MIB:.1f}→{b / MIB:.1f}" for a, b in steps) or "none"  # noqa: E731
            print(f"{spec}: weights {r['weights_mib']:.1f} MiB, reserved {r['reserved_mib']:.1f}, heap "
                  f"{r['ort_heap_mib']:.1f}, UA memory API {r['ua_memory_mib']:.1f} MiB ({r['ua_over_weights']:.3f}x), "
                  f"Pyodide heap {r['pyodide_heap_mib']:.1f}, page memory {r['page_memory_mib']:.1f} MiB "
                  f"({r['page_over_weights']:.3f}x), "
                  f"decode {r['decode_tok_s'] or 0:.1f} tok/s\n  grew loading: {fmt(r['steps_loading'])}\n"
                  f"  grew generating: {fmt(r['steps_generating'])}", flush=True)
    save_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
