"""A/B on the page: two or more (bundle, page parameters) configurations, each loaded cold in a fresh Chromium
and then warm, rounds interleaved (A, B, A, B, ...), medians with min–max. For one change at a time — a graph
rewrite (two bundles of the same weights), an onnxruntime-web build (?ort=) — where `python -m bench` measures
everything against everything.

    python bench/page_ab.py --bundles /tmp/ab old=smollm2-int8-old new=smollm2-int8 --reps 3
    python bench/page_ab.py jsep=smollm2-int8?ort=webgpu plain=smollm2-int8 --reps 3

Writes bench/results/page_ab.json. WASM EP, 1 thread unless a configuration says otherwise (?threads=).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.browser import Server, run_page, skip_reason  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a screw press into a system that")


def parse_config(text: str) -> tuple[str, str, dict]:
    label, _, rest = text.partition("=")
    if not label or not rest:
        raise SystemExit(f"configuration {text!r}: expected label=bundle[?param=value&...]")
    bundle, _, query = rest.partition("?")
    return label, bundle, dict(parse_qsl(query))


def summary(values: list[float]) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    return f"{med:.2f} ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else f"{med:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="label=bundle[?page params], e.g. plain=smollm2-int8?threads=1")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"), help="folder the dev server lists")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "page_ab.json"))
    args = ap.parse_args(argv)
    if (why := skip_reason()):
        print(f"cannot run: {why}")
        return 2
    configs = [parse_config(c) for c in args.configs]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    with Server(Path(args.bundles)) as server:
        for r in range(args.reps):
            for label, bundle, extra in configs:
                extra = dict(extra)
                threads = int(extra.pop("threads", 1))
                t0 = time.perf_counter()
                res = run_page(server, bundle, extra.pop("ep", "wasm"), threads, PROMPT, args.new_tokens, extra=extra)
                g, cold, warm = res["generate"], res["cold"], res["warm"]
                row = {"round": r, "ort_build": res.get("ort_build"), "ep": res["ep"],
                       "cold_session_s": cold["sessionMs"] / 1000, "warm_session_s": warm["sessionMs"] / 1000,
                       "cold_ready_s": cold["readyAt"] / 1000, "warm_ready_s": warm["readyAt"] / 1000,
                       "download_s": cold["downloadMs"] / 1000,
                       # the loader's own clock: files fetched + decoded (bundle), the decode's tail after the download
                       "cold_bundle_s": cold["totalMs"] / 1000, "warm_bundle_s": warm["totalMs"] / 1000,
                       "cold_decode_tail_s": cold["decodeAfterDownloadMs"] / 1000,
                       "warm_decode_tail_s": warm["decodeAfterDownloadMs"] / 1000, "prefill_tok_s": g["prefillTokS"],
                       "decode_tok_s": g["decodeTokS"], "first_token_s": g["firstTokenMs"] / 1000,
                       "run_ms_per_step": g["profile"]["session"]["runMs"] / max(g["profile"]["session"]["calls"], 1),
                       # the page's own loop around session.run, a decode step: the logits' top candidates (JS), Python
                       "topk_ms_per_step": g["profile"]["session"]["topkMs"] / max(g["profile"]["session"]["calls"], 1),
                       "python_ms_per_step": g["profile"]["pushMs"] / max(g["profile"]["steps"] - 1, 1),
                       "peak_mib": res["memory"]["peak_mib"], "text": g["text"][:80], "wall_s": time.perf_counter() - t0}
                pm = res.get("page_memory") or {}
                if "pyodideHeap" in pm:
                    row["pyodide_heap_mib"] = pm["pyodideHeap"] / 2**20
                if pm.get("ortHeap"):
                    row["ort_heap_mib"] = pm["ortHeap"] / 2**20
                if "uaMemory" in pm:
                    row["ua_memory_mib"] = pm["uaMemory"] / 2**20
                    if pm.get("weightBytes"):    # what the session was given: the ratio the target is on
                        row["ua_over_weights"] = pm["uaMemory"] / pm["weightBytes"]
                    row["ua_memory_by_scope_mib"] = {k: round(v / 2**20, 1) for k, v in pm["uaMemoryByScope"].items()}
                if "pageMemory" in pm:           # the API's total + Pyodide's heap, which it leaves out
                    row["page_memory_mib"] = pm["pageMemory"] / 2**20
                    if pm.get("weightBytes"):
                        row["page_over_weights"] = pm["pageMemory"] / pm["weightBytes"]
                runs[label].append(row)
                print(f"round {r} {label}: session cold {row['cold_session_s']:.2f} s warm {row['warm_session_s']:.2f} s, "
                      f"prefill {row['prefill_tok_s']:.1f} tok/s, decode {row['decode_tok_s']:.2f} tok/s "
                      f"({res.get('ort_build')} build, {res['ep']})", flush=True)
    keys = [("cold_bundle_s", "bundle cold s"), ("warm_bundle_s", "bundle warm s"),
            ("cold_decode_tail_s", "decode after download cold s"), ("warm_decode_tail_s", "decode after download warm s"),
            ("cold_session_s", "session cold s"), ("warm_session_s", "session warm s"),
            ("cold_ready_s", "ready cold s"), ("warm_ready_s", "ready warm s"), ("prefill_tok_s", "prefill tok/s"),
            ("decode_tok_s", "decode tok/s"), ("run_ms_per_step", "session.run ms/step"),
            ("topk_ms_per_step", "top candidates ms/step"), ("python_ms_per_step", "Python ms/step"), ("peak_mib", "peak PSS MiB"),
            ("ua_memory_mib", "UA memory API MiB"), ("pyodide_heap_mib", "Pyodide heap MiB"),
            ("page_memory_mib", "page memory MiB"), ("page_over_weights", "page memory / weights"),
            ("ort_heap_mib", "onnxruntime-web heap MiB")]
    lines = ["| configuration | " + " | ".join(h for _, h in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, bundle, extra in configs:
        lines.append(f"| {label} ({bundle}{'?' + '&'.join(f'{k}={v}' for k, v in extra.items()) if extra else ''}) | "
                     + " | ".join(summary([row[k] for row in runs[label] if k in row]) for k, _ in keys) + " |")
    table = "\n".join(lines)
    print(table)
    texts = {label: sorted({row["text"] for row in rows}) for label, rows in runs.items()}
    print("generated text per configuration:", json.dumps(texts, ensure_ascii=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"configs": args.configs, "reps": args.reps, "new_tokens": args.new_tokens,
                                          "runs": runs, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
