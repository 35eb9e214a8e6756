"""What the opt-in offline copy (static/sw.js, "Keep for offline use") costs a return visit: per round, two fresh
on-disk profiles — one plain, one that pressed the button on its first visit — then each browser is closed and
relaunched on its profile (a return visit: HTTP cache, Cache API, V8's code cache and, for the second, the service
worker) and times navigation → ready (`tinyqmoe.state.loadTimings.readyAt`), its session creation, and the first
reply's decode speed. Interleaved rounds, medians.

    python bench/offline_ab.py [--bundle smollm2-int4-m32] [--rounds 3] [--new-tokens 16] [--out F]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import Server, _launch_profile, _wait_ready, save_json, skip_reason  # noqa: E402
from bench.page_ab import PROMPT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def visit(pw, profile: str, url: str, keep: bool, tokens: int) -> dict:
    ctx = _launch_profile(pw, profile)
    try:
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.goto(url)
        _wait_ready(page, 600_000)
        if keep:
            with page.expect_navigation():
                page.click("#offline-btn")
            _wait_ready(page, 600_000)
        t = page.evaluate("window.tinyqmoe.state.loadTimings")
        g = page.evaluate("([p, n]) => window.tinyqmoe.generate(p, {raw: p, max_new_tokens: n, ignore_eos: true})",
                          [PROMPT, tokens])
        return {"ready_s": t["readyAt"] / 1000, "session_s": t["sessionMs"] / 1000, "decode_tok_s": g["decodeTokS"],
                "offline": page.evaluate("window.tinyqmoe.offline()")}
    finally:
        ctx.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="smollm2-int4-m32")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    from playwright.sync_api import sync_playwright

    runs: dict[str, list[dict]] = {"plain": [], "kept offline": []}
    with Server(Path(args.bundles)) as server, sync_playwright() as pw:
        url = f"{server}/?bundle={args.bundle}&ep=wasm&threads=1&autoload=1"
        for r in range(args.rounds):
            for label, keep in (("plain", False), ("kept offline", True)):
                with tempfile.TemporaryDirectory() as profile:
                    visit(pw, profile, url, keep, args.new_tokens)                 # first visit
                    row = visit(pw, profile, url, False, args.new_tokens)          # return visit
                if row["offline"] != keep:
                    raise RuntimeError(f"{label}: the return visit {'is' if row['offline'] else 'is not'} served "
                                       "through the service worker")
                runs[label].append(row)
                print(f"round {r + 1} {label}: return visit ready {row['ready_s']:.2f} s, session "
                      f"{row['session_s']:.2f} s, decode {row['decode_tok_s']:.1f} tok/s", flush=True)
    summary = {label: {k: statistics.median(row[k] for row in rows) for k in ("ready_s", "session_s", "decode_tok_s")}
               for label, rows in runs.items()}
    for label, s in summary.items():
        print(f"{label:13s} return visit: ready {s['ready_s']:.2f} s, session {s['session_s']:.2f} s, "
              f"decode {s['decode_tok_s']:.1f} tok/s (medians of {args.rounds})")
    save_json(args.out, {"bundle": args.bundle, "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
