"""Decode speed of the first reply after a load against the replies after it: the page (WASM EP) and wllama, at 1
and 2 threads, each in a fresh Chromium that loads once and then generates the same greedy completion --replies
times (`python -m bench` times the first reply of a load and the next one; this follows several).

    python bench/later_replies.py --bundles /tmp/ab smollm2-int4-m32 smollm2-int8 --replies 4 --rounds 2

The page's bundles come from --bundles; wllama runs the default model's GGUF (bundles/smollm2-gguf, as `python -m
bench` links it). Prints decode tok/s per reply and writes bench/results/later_replies.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import Server, _launch, _wait_ready, skip_reason  # noqa: E402
from bench.generate import PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF = "smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"


def page_replies(pw, server: str, bundle: str, threads: int, replies: int, new_tokens: int) -> list[float]:
    browser = _launch(pw)
    try:
        page = browser.new_context().new_page()
        page.goto(f"{server}/?bundle={bundle}&ep=wasm&threads={threads}&autoload=1")
        _wait_ready(page, 600_000)
        js = "([p, n]) => window.tinyqmoe.generate(p, {raw: p, max_new_tokens: n, ignore_eos: true})"
        return [page.evaluate(js, [PROMPT, new_tokens])["decodeTokS"] for _ in range(replies)]
    finally:
        browser.close()


def wllama_replies(pw, server: str, threads: int, replies: int, new_tokens: int) -> list[float]:
    browser = _launch(pw)
    try:
        page = browser.new_context().new_page()
        page.goto(f"{server}/static/bench/wllama.html")
        page.wait_for_function("window.wbench && window.wbench.ready", timeout=60_000)
        page.set_default_timeout(600_000)
        page.evaluate("([u, o]) => wbench.load(u, o)", [f"/bundles/{GGUF}", {"threads": threads, "gpuLayers": 0}])
        return [page.evaluate("([p, n]) => wbench.complete(p, n, [])", [PROMPT, new_tokens])["decodeTokS"]
                for _ in range(replies)]
    finally:
        browser.close()


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="bundle names in --bundles")
    ap.add_argument("--bundles", dest="folder", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--replies", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-wllama", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "later_replies.json"))
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    folder = Path(args.folder)
    if not args.no_wllama and not (folder / GGUF).exists():
        raise SystemExit(f"{folder / GGUF} is missing (python -m bench links it), or pass --no-wllama")
    configs = [(f"page/{b}/t{t}", b, t) for b in args.bundles for t in (1, 2)]
    if not args.no_wllama:
        configs += [(f"wllama/t{t}", None, t) for t in (1, 2)]
    runs: dict[str, list[list[float]]] = {label: [] for label, _, _ in configs}
    with Server(folder) as server, sync_playwright() as pw:
        for r in range(args.rounds):
            for label, bundle, threads in configs:
                got = (page_replies(pw, server, bundle, threads, args.replies, args.new_tokens) if bundle else
                       wllama_replies(pw, server, threads, args.replies, args.new_tokens))
                runs[label].append(got)
                print(f"round {r} {label}: decode tok/s per reply {[round(v, 1) for v in got]}", flush=True)
    lines = ["| configuration | first reply after the load | later replies (median) |", "|---|---|---|"]
    summary = {}
    for label, rows in runs.items():
        first = statistics.median(row[0] for row in rows)
        later = statistics.median(v for row in rows for v in row[1:])
        summary[label] = {"first": first, "later": later}
        lines.append(f"| {label} | {first:.1f} | {later:.1f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompt": PROMPT, "new_tokens": args.new_tokens, "runs": runs,
                                          "summary": summary, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
