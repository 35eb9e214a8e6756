"""Time to first token, turn by turn, in a chat: with the KV cache of the earlier turns kept (only the new message is
prefilled) and without (the whole conversation again every turn), on onnxruntime CPU and in the page.

    python bench/chat_turns.py [--bundle smollm2-int8] [--turns 6] [--new-tokens 48] [--reps 2] [--no-page]

The same conversation (fixed questions, greedy, each reply appended as the model gave it) is replayed `--reps` times
per mode, the modes alternating (kept, whole, kept, whole...) in one process / one page, so that the machine's load
hits both alike. Prints prompt tokens, tokens actually prefilled and the median time to first token per turn, and
writes bench/results/chat_turns.json. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ["What is the capital of France?", "What is it famous for?", "Name three museums there.",
             "Which river runs through it?", "How old is the city?", "Suggest a one-day walking route.",
             "What should I eat there?", "Thank you. Summarise our conversation."]


def cpu_conversation(chat, turns: int, new_tokens: int, reuse: bool) -> list[dict]:
    from converter.runtime.generate import SamplingConfig

    history, out = [], []
    chat.session.reset()
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        t0 = time.perf_counter()
        res = chat.generate(chat.prompt_ids(history), SamplingConfig(max_new_tokens=new_tokens), reuse=reuse)
        out.append({"prompt_tokens": res.prompt_tokens, "cached_tokens": res.cached_tokens,
                    "first_token_s": res.prefill_seconds, "total_s": time.perf_counter() - t0,
                    "tokens": res.token_ids})
        history.append({"role": "assistant", "content": res.text})
    return out


def page_conversation(page, turns: int, new_tokens: int, reuse: bool) -> list[dict]:
    history, out = [], []
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        r = page.evaluate("([m, n, reuse]) => window.tinyqmoe.generate(m, {max_new_tokens: n, reuse})",
                          [history, new_tokens, reuse])
        out.append({"prompt_tokens": r["promptTokens"], "cached_tokens": r["cachedTokens"],
                    "first_token_s": r["firstTokenMs"] / 1000, "total_s": r["totalMs"] / 1000, "tokens": r["tokens"]})
        history.append({"role": "assistant", "content": r["text"]})
    return out


def summarise(runs: dict[str, list[list[dict]]]) -> list[dict]:
    rows = []
    for mode, convs in runs.items():
        for t in range(len(convs[0])):
            ttft = [c[t]["first_token_s"] for c in convs]
            rows.append({"mode": mode, "turn": t + 1, "prompt_tokens": convs[0][t]["prompt_tokens"],
                         "prefilled": convs[0][t]["prompt_tokens"] - convs[0][t]["cached_tokens"],
                         "first_token_s": statistics.median(ttft), "min": min(ttft), "max": max(ttft),
                         "same_tokens": all(c[t]["tokens"] == convs[0][t]["tokens"] for c in convs)})
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n{'mode':28} {'turn':>4} {'prompt':>7} {'prefilled':>9} {'first token s':>22}")
    for r in rows:
        print(f"{r['mode']:28} {r['turn']:4d} {r['prompt_tokens']:7d} {r['prefilled']:9d} "
              f"{r['first_token_s']:8.3f} ({r['min']:.3f}–{r['max']:.3f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="smollm2-int8")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"))
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-page", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chat_turns.json"))
    args = ap.parse_args(argv)
    from converter.cli import open_chat_model

    path = Path(args.bundles) / args.bundle
    modes = {"cache kept (reuse)": True, "whole conversation (before)": False}
    chat = open_chat_model(str(path))
    cpu = {m: [] for m in modes}
    for _ in range(args.reps):
        for m, reuse in modes.items():
            cpu[m].append(cpu_conversation(chat, args.turns, args.new_tokens, reuse))
    result = {"bundle": args.bundle, "turns": args.turns, "new_tokens": args.new_tokens, "reps": args.reps,
              "cpu": summarise(cpu)}
    print_rows(f"onnxruntime CPU, {args.bundle}, 1 thread", result["cpu"])
    if not args.no_page:
        from playwright.sync_api import sync_playwright

        from bench.browser import Server, _launch, _wait_ready, skip_reason
        if (why := skip_reason()):
            print(f"page: skipped ({why})")
        else:
            with Server(Path(args.bundles)) as server, sync_playwright() as pw:
                browser = _launch(pw)
                page = browser.new_page()
                page.goto(f"{server}/?bundle={args.bundle}&ep=wasm&autoload=1")
                _wait_ready(page, 600_000)
                page.evaluate("window.tinyqmoe.pyReady")
                runs = {m: [] for m in modes}
                for _ in range(args.reps):
                    for m, reuse in modes.items():
                        runs[m].append(page_conversation(page, args.turns, args.new_tokens, reuse))
                browser.close()
            result["page"] = summarise(runs)
            print_rows(f"page, WASM EP, {args.bundle}", result["page"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
