"""Lookahead (converter/runtime/generate.py) on chat replies: the page and onnxruntime CPU, without and with draft
tokens, interleaved question by question, on the same bundle and graph.

    python bench/lookahead.py --bundles /tmp/ab smollm2-int8 smollm2-int4-m32 --lookahead 0,2,3,4 --reps 2

Each bundle is loaded once in Chromium (WASM EP, --threads threads, default 1, the wasm graph the page runs); every
question is asked with each lookahead in turn (the cache emptied before each), greedy, up to --max-new-tokens,
stopping at the end of the reply. The CPU side runs the same graph (model.wasm.onnx) in onnxruntime, as many
threads. Per configuration: decode tokens per second over all replies (the tokens the runs after each prefill chose,
over their time), tokens per run, and how many replies are token for token the lookahead-0 reply (a checked
position's logits equal a one-token step's up to float rounding, which can tip a near-tie). Writes
bench/results/lookahead.json.
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

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?", "Write a Python function that reverses a string.",
    "Explain photosynthesis in two sentences.", "List three uses of copper.",
    "Summarize: The cat sat on the mat. The dog lay by the door. Both were asleep when the owner came home.",
    "What is 12 times 7?", "Give me a recipe for pancakes.", "Translate 'good morning' into Spanish and French.",
    "Why is the sky blue?", "Write a haiku about autumn.", "How do I make a list in HTML?",
    "Rewrite this sentence more formally: gonna grab some food, brb.",
]


def page_runs(server: str, bundle: str, lookaheads: list[int], reps: int, max_new: int, questions: list[str],
              threads: int = 1) -> dict:
    from playwright.sync_api import sync_playwright

    out = {k: [] for k in lookaheads}
    js = ("([q, n, k]) => window.tinyqmoe.generate(q, {max_new_tokens: n, lookahead: k}).then(r => "
          "({tokens: r.tokens, decodeTokens: r.decodeTokens, decodeMs: r.profile.decodeMs, runs: r.profile.steps - 1}))")
    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_context().new_page()
            page.goto(f"{server}/?bundle={bundle}&ep=wasm&threads={threads}&autoload=1")
            _wait_ready(page, 600_000)
            page.evaluate(js, [questions[0], 8, 0])                         # warm-up
            for r in range(reps):
                for q in questions:
                    for k in (lookaheads if r % 2 == 0 else lookaheads[::-1]):
                        out[k].append({"round": r, "question": q, **page.evaluate(js, [q, max_new, k])})
        finally:
            browser.close()
    return out


def cpu_runs(bundle_path: Path, lookaheads: list[int], reps: int, max_new: int, questions: list[str],
             threads: int = 1) -> dict:
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    chat = open_chat_model(str(bundle_path), graph="wasm", threads=threads)
    out = {k: [] for k in lookaheads}
    for r in range(reps):
        for q in questions:
            ids = chat.prompt_ids([{"role": "user", "content": q}])
            for k in (lookaheads if r % 2 == 0 else lookaheads[::-1]):
                res = chat.generate(ids, SamplingConfig(max_new_tokens=max_new, lookahead=k), reuse=False)
                out[k].append({"round": r, "question": q, "tokens": res.token_ids,
                               "decodeTokens": max(res.sampled - 1, 0), "decodeMs": res.decode_seconds * 1000,
                               "runs": res.decode_steps})
    return out


def summarize(runs: dict, base: int) -> dict:
    ref = {(x["round"], x["question"]): x["tokens"] for x in runs[base]}
    rows = {}
    for k, xs in runs.items():
        per_round = {}
        for x in xs:
            t = per_round.setdefault(x["round"], [0, 0.0, 0])
            t[0] += x["decodeTokens"]; t[1] += x["decodeMs"]; t[2] += x["runs"]
        rates = [n / (ms / 1000) for n, ms, _ in per_round.values() if ms > 0]
        rows[k] = {"decode_tok_s": statistics.median(rates), "decode_tok_s_min": min(rates),
                   "decode_tok_s_max": max(rates),
                   "tokens_per_run": sum(t[0] for t in per_round.values()) / max(sum(t[2] for t in per_round.values()), 1),
                   "same_reply": sum(x["tokens"] == ref[(x["round"], x["question"])] for x in xs), "replies": len(xs)}
    for k in rows:
        rows[k]["speedup"] = rows[k]["decode_tok_s"] / rows[base]["decode_tok_s"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="bundle names in --bundles")
    ap.add_argument("--bundles", dest="folder", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--lookahead", default="0,3", help="comma-separated draft counts; the first is the baseline")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads, the page's and the CPU's")
    ap.add_argument("--questions", type=int, default=len(QUESTIONS), help="the first N questions only")
    ap.add_argument("--no-cpu", action="store_true", help="the page only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lookahead.json"))
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    lookaheads = [int(v) for v in args.lookahead.split(",")]
    questions = QUESTIONS[:args.questions]
    result = {"questions": questions, "threads": args.threads, "lookahead": lookaheads, "reps": args.reps,
              "max_new_tokens": args.max_new_tokens, "bundles": {}}
    lines = ["| bundle | runs on | lookahead | decode tok/s, median of rounds (min–max) | × lookahead "
             f"{lookaheads[0]} | tokens per run | replies equal to lookahead {lookaheads[0]}'s |", "|---" * 7 + "|"]
    with Server(Path(args.folder)) as server:
        for name in args.bundles:
            t0 = time.perf_counter()
            sides = {"page": page_runs(server, name, lookaheads, args.reps, args.max_new_tokens, questions,
                                       args.threads)}
            if not args.no_cpu:
                sides["ortcpu"] = cpu_runs(Path(args.folder) / name, lookaheads, args.reps, args.max_new_tokens,
                                           questions, args.threads)
            result["bundles"][name] = {side: {"runs": {str(k): v for k, v in runs.items()},
                                              "summary": {str(k): v for k, v in summarize(runs, lookaheads[0]).items()}}
                                       for side, runs in sides.items()}
            for side in sides:
                for k, s in result["bundles"][name][side]["summary"].items():
                    lines.append(f"| {name} | {side} | {k} | {s['decode_tok_s']:.2f} ({s['decode_tok_s_min']:.2f}–"
                                 f"{s['decode_tok_s_max']:.2f}) | {s['speedup']:.2f} | {s['tokens_per_run']:.2f} | "
                                 f"{s['same_reply']} of {s['replies']} |")
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = "\n".join(lines)
    print(table)
    result["table"] = table
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
