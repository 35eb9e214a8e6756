"""Where the page's memory is, by a V8 heap snapshot: loads a bundle (WASM EP, 1 thread), generates, then groups the
snapshot's nodes by type and name and lists the largest single ones (array buffers: onnxruntime-web's heap,
Pyodide's heap, Pyodide's standard library zip, the KV cache the page appends to) beside the page memory
(the UA memory API's total + Pyodide's heap, bench/browser.py).

    python bench/page_snapshot.py [smollm2-int4-m32] [--new-tokens 40] [--out F]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import PAGE_MEMORY_JS, Server, _launch, _wait_ready, save_json, skip_reason  # noqa: E402
from bench.page_ab import PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20


def snapshot(pw, server: str, bundle: str, tokens: int) -> tuple[dict, dict]:
    browser = _launch(pw)
    try:
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(f"{server}/?bundle={bundle}&ep=wasm&threads=1&autoload=1")
        _wait_ready(page, 900_000)
        page.evaluate("([p, n]) => window.tinyqmoe.generate(p, {raw: p, max_new_tokens: n, ignore_eos: true})",
                      [PROMPT, tokens])
        pm = page.evaluate(PAGE_MEMORY_JS)
        cdp = ctx.new_cdp_session(page)
        chunks: list[str] = []
        cdp.on("HeapProfiler.addHeapSnapshotChunk", lambda e: chunks.append(e["chunk"]))
        cdp.send("HeapProfiler.enable")
        cdp.send("HeapProfiler.takeHeapSnapshot", {"reportProgress": False})
        return pm, json.loads("".join(chunks))
    finally:
        browser.close()


def summarise(snap: dict, top: int = 12) -> dict:
    meta = snap["snapshot"]["meta"]
    fields, types = meta["node_fields"], meta["node_types"][0]
    step, nodes, strings = len(fields), snap["nodes"], snap["strings"]
    ti, ni, si = fields.index("type"), fields.index("name"), fields.index("self_size")
    by_kind, count, largest = collections.Counter(), collections.Counter(), []
    for k in range(0, len(nodes), step):
        kind = f"{types[nodes[k + ti]]}: {strings[nodes[k + ni]][:48].strip()}"
        size = nodes[k + si]
        by_kind[kind] += size
        count[kind] += 1
        largest.append((size, kind))
    largest.sort(reverse=True)
    return {"total_mib": sum(by_kind.values()) / MIB,
            "by_kind_mib": [{"kind": k, "mib": round(v / MIB, 2), "nodes": count[k]} for k, v in by_kind.most_common(top)],
            "largest_mib": [{"kind": k, "mib": round(v / MIB, 2)} for v, k in largest[:top]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", default="smollm2-int4-m32")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    from playwright.sync_api import sync_playwright

    with Server(Path(args.bundles)) as server, sync_playwright() as pw:
        pm, snap = snapshot(pw, server, args.bundle, args.new_tokens)
    out = {"bundle": args.bundle, "new_tokens": args.new_tokens,
           "page_memory_mib": pm.get("pageMemory", 0) / MIB, "ua_memory_mib": pm.get("uaMemory", 0) / MIB,
           "pyodide_heap_mib": (pm.get("pyodideHeap") or 0) / MIB, "ort_heap_mib": (pm.get("ortHeap") or 0) / MIB,
           "snapshot": summarise(snap)}
    print(f"{args.bundle}: page memory {out['page_memory_mib']:.1f} MiB (UA API {out['ua_memory_mib']:.1f} + Pyodide "
          f"{out['pyodide_heap_mib']:.1f}); onnxruntime-web heap {out['ort_heap_mib']:.1f}; V8 heap snapshot "
          f"{out['snapshot']['total_mib']:.1f} MiB")
    print("by kind:")
    for r in out["snapshot"]["by_kind_mib"]:
        print(f"  {r['mib']:8.2f} MiB {r['nodes']:7d} nodes  {r['kind']}")
    print("largest nodes:")
    for r in out["snapshot"]["largest_mib"]:
        print(f"  {r['mib']:8.2f} MiB  {r['kind']}")
    save_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
