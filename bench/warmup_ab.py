"""The page's warm-ups, A/B: a first visit's first reply with none (`--modes off`, `?warmup=0`), with the warm-up
after the load alone (`after`, static/js/app.js warmUp, session 25) and with the bundle's warm-up model run while
the weights load as well (`on`, the default: proxyWarmUp, session 26), after the user's think time — the seconds
between the page being ready and the first message — of 0 s (asked at once: a warm-up stops after its current
step) and of a few seconds.

    python bench/warmup_ab.py --bundles /tmp/ab smollm2-int4-m32 --think 0,3 --rounds 3
    python bench/warmup_ab.py smollm2-int4-m32 smollm2-int8 --think 0 --threads 2,1 --modes after,on --rounds 3

Each load runs in a fresh Chromium (incognito: no V8 code cache, a first visit), generates the same greedy
completion twice (the first reply and the next one) and records what the warm-ups did. Prints load -> ready ms,
decode tok/s and the first token's ms from the call — the prefill and the wait for the warm-up's current step among
them — per configuration (medians over rounds) and writes bench/results/warmup_ab.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import Server, _launch, _wait_ready, skip_reason  # noqa: E402
from bench.generate import PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the page's ?warmup=: "off" none, "after" the warm-up after the load only (session 25), "on" (the default) the
# warm-up model while the weights load too (session 26)
WARMUP_PARAM = {"off": "0", "after": "after", "on": "1"}
GEN_JS = "([p, n]) => window.tinyqmoe.generate(p, {raw: p, max_new_tokens: n, ignore_eos: true})"


def one_load(pw, server: str, bundle: str, threads: int, warmup: str, think: float, new_tokens: int) -> dict:
    browser = _launch(pw)
    try:
        page = browser.new_context().new_page()
        page.goto(f"{server}/?bundle={bundle}&ep=wasm&threads={threads}&autoload=1&warmup={WARMUP_PARAM[warmup]}")
        _wait_ready(page, 600_000)
        time.sleep(think)
        first = page.evaluate(GEN_JS, [PROMPT, new_tokens])
        w = page.evaluate("window.tinyqmoe.warmedUp()")
        proxy = page.evaluate("window.tinyqmoe.state.proxyWarmup")
        lt = page.evaluate("window.tinyqmoe.state.loadTimings")
        again = page.evaluate(GEN_JS, [PROMPT, new_tokens])
        p = first["profile"]
        return {"first_tok_s": first["decodeTokS"], "prefill_ms": p["prefillMs"], "proxy": proxy,
                "ready_ms": lt["readyAt"] - lt["loadStartAt"],
                # asked -> the first run's start: the wait for the warm-up's current step, and the tokenizer
                "wait_ms": p["startAt"] - p["askedAt"], "first_token_ms": first["firstTokenMs"],
                "next_tok_s": again["decodeTokS"], "same_tokens": first["tokens"] == again["tokens"],
                "first_step_ms": p["stepMs"], "warmup": w}
    finally:
        browser.close()


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="bundle names in --bundles")
    ap.add_argument("--bundles", dest="folder", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--think", default="0,3", help="comma list of seconds between ready and the first message")
    ap.add_argument("--threads", default="1,2", help="comma list of onnxruntime-web thread counts")
    ap.add_argument("--modes", default="off,on", help="comma list of warm-up modes: off, after, on")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "warmup_ab.json"))
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    configs = [(f"{b}/t{t}/think{think:g}/warmup-{w}", b, t, w, think)
               for b in args.bundles for t in map(int, args.threads.split(","))
               for think in map(float, args.think.split(",")) for w in args.modes.split(",")]
    runs: dict[str, list[dict]] = {label: [] for label, *_ in configs}
    with Server(Path(args.folder)) as server, sync_playwright() as pw:
        for r in range(args.rounds):
            for label, bundle, threads, warmup, think in configs:       # interleaved: every configuration a round
                got = one_load(pw, server, bundle, threads, warmup, think, args.new_tokens)
                runs[label].append(got)
                w = got["warmup"]
                px = got["proxy"]
                print(f"round {r} {label}: ready after {got['ready_ms']:.0f} ms, first reply {got['first_tok_s']:.1f} "
                      f"tok/s (first token after {got['first_token_ms']:.0f} ms, prefill {got['prefill_ms']:.0f}), next "
                      f"{got['next_tok_s']:.1f}" + (f"; warm-up {w['steps']} steps, {w['ms']:.0f} ms" if w else "")
                      + (f"; warm-up model {px['steps']} steps, {px['ms']:.0f} ms" if px else ""), flush=True)
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    lines = ["| configuration | load -> ready ms | first reply tok/s | asked -> first token ms | of which prefill | "
             "of which waiting | next reply tok/s | warm-up steps / ms | warm-up model steps / ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for label, rows in runs.items():
        ws = [x["warmup"] for x in rows if x["warmup"]]
        ps = [x["proxy"] for x in rows if x["proxy"]]
        summary[label] = {"ready_ms": med(rows, "ready_ms"), "first_tok_s": med(rows, "first_tok_s"), "prefill_ms": med(rows, "prefill_ms"),
                          "first_token_ms": med(rows, "first_token_ms"), "wait_ms": med(rows, "wait_ms"),
                          "next_tok_s": med(rows, "next_tok_s"),
                          "warmup_steps": statistics.median(w["steps"] for w in ws) if ws else None,
                          "warmup_ms": statistics.median(w["ms"] for w in ws) if ws else None,
                          "proxy_steps": statistics.median(p["steps"] for p in ps) if ps else None,
                          "proxy_ms": statistics.median(p["ms"] for p in ps) if ps else None,
                          "same_tokens": all(x["same_tokens"] for x in rows)}
        s = summary[label]
        lines.append(f"| {label} | {s['ready_ms']:.0f} | {s['first_tok_s']:.1f} | {s['first_token_ms']:.0f} | "
                     f"{s['prefill_ms']:.0f} | {s['wait_ms']:.0f} | {s['next_tok_s']:.1f} | "
                     + (f"{s['warmup_steps']:g} / {s['warmup_ms']:.0f} |" if ws else "– |")
                     + (f" {s['proxy_steps']:g} / {s['proxy_ms']:.0f} |" if ps else " – |"))
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompt": PROMPT, "new_tokens": args.new_tokens, "runs": runs,
                                          "summary": summary, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
