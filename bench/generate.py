"""Tokens/s and peak memory of the reference path (pure-Python runtime + onnxruntime CPU) per SmolLM2 bundle.

    python bench/generate.py [--bundles bundles] [--schemes f32,int8,int4-g32,ternary] [--reps 3]

Builds the missing bundles, then runs each scheme in its own process (so peak RSS is that scheme's alone), A/B
interleaved over `--reps` rounds: a 41-token prompt, 64 greedy tokens (eos ignored), 1 thread. Prints a table
of medians (min–max) and writes bench/results/generate.json. A benchmark, not a test: these machines are shared.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("Large language models can run on small devices when their weights are quantized and compressed. "
          "Explain in a few sentences why that matters for people")


def child(bundle: str, new_tokens: int) -> dict:
    """One measurement in this process (called with --child)."""
    import resource
    import time

    sys.path.insert(0, str(ROOT))
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig, generate

    t0 = time.perf_counter()
    chat = open_chat_model(bundle)
    load_s = time.perf_counter() - t0
    ids = chat.tokenizer.encode(PROMPT)[:41]
    res = generate(chat.session, chat.tokenizer, ids, eos_ids=[], cfg=SamplingConfig(max_new_tokens=new_tokens))
    return {"load_s": load_s, "prompt_tokens": len(ids), "new_tokens": len(res.token_ids),
            "prefill_tok_s": res.prefill_tok_s, "decode_tok_s": res.decode_tok_s,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", default=str(ROOT / "bundles"))
    ap.add_argument("--schemes", default="f32,int8,int4-g32,ternary")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.new_tokens)))
        return 0

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    schemes = args.schemes.split(",")
    for s in schemes:
        if not (Path(args.bundles) / f"smollm2-{s}" / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "converter", "build", "--scheme", s, "--bundles", args.bundles],
                           cwd=ROOT, check=True, env=env)
    runs: dict[str, list[dict]] = {s: [] for s in schemes}
    for rep in range(args.reps):                       # interleaved: every scheme once per round
        for s in schemes:
            out = subprocess.run([sys.executable, __file__, "--child", str(Path(args.bundles) / f"smollm2-{s}"),
                                  "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True, env=env, check=True)
            runs[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {rep + 1}/{args.reps} {s}: {runs[s][-1]}", file=sys.stderr)

    rows = []
    for s in schemes:
        m = json.loads((Path(args.bundles) / f"smollm2-{s}" / "manifest.json").read_text())
        row = {"scheme": s, "runtime_weight_mb": m["totals"]["runtime_bytes"] / 1e6,
               "bundle_mb": m["totals"]["bundle_bytes"] / 1e6, "runs": runs[s]}
        for k in ("prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mib"):
            vals = [r[k] for r in runs[s]]
            row[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        rows.append(row)
    print(f"\n{'scheme':10} {'prefill tok/s':>18} {'decode tok/s':>16} {'load s':>7} {'peak RSS MiB':>13} "
          f"{'weights MB':>11} {'RSS/weights':>11}")
    for r in rows:
        f = lambda k, d=1: f"{r[k]['median']:.{d}f} ({r[k]['min']:.{d}f}–{r[k]['max']:.{d}f})"  # noqa: E731
        print(f"{r['scheme']:10} {f('prefill_tok_s', 0):>18} {f('decode_tok_s'):>16} {r['load_s']['median']:7.2f} "
              f"{r['peak_rss_mib']['median']:13.0f} {r['runtime_weight_mb']:11.1f} "
              f"{r['peak_rss_mib']['median'] * 1.048576 / r['runtime_weight_mb']:11.2f}")
    out = ROOT / "bench" / "results" / "generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_tokens": 41, "new_tokens": args.new_tokens, "threads": 1,
                               "load_average": os.getloadavg(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
