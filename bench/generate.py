"""Tokens/s and peak memory of the reference path (pure-Python runtime + onnxruntime CPU) per SmolLM2 bundle.

    python bench/generate.py [--bundles bundles] [--schemes f32,int8,int4-g32,ternary]
                             [--modes default,low-memory,strict[,int8-compute,inplace,low-memory-inplace,strict-inplace]] [--reps 3] [--new-tokens 64] [--out JSON]

Builds the missing bundles, then runs each scheme and mode in its own process (so peak RSS is that run's alone),
A/B interleaved over `--reps` rounds: a fixed prompt (27 tokens for SmolLM2; the JSON has the count), 64 greedy
tokens (eos ignored), 1 thread. Modes: `default` (one onnxruntime session), `low-memory` (one per stage of layers,
converter/ort_stages.py), `strict` (the same, a tied embedding held once: ort_stages.STRICT) and, when asked for,
`int8-compute` (one session, the group schemes' MatMulNBits multiplying in int8: --int8-compute). Peak RSS is reported
whole, above the process's RSS just before the bundle is opened (Python, numpy, onnxruntime and our imports), and
above the RSS once the manifest, the tokenizer and the wasm codec are loaded ("session": what onnxruntime and the
weights add), each also as a ratio to the runtime weight bytes (the weights as the session holds them:
ort_session.session_weight_bytes; the ratio to the bundle's stored bytes is kept too) + the KV cache of the run.
Prints a table of medians
(min–max) and writes bench/results/generate.json. A benchmark, not a test: these machines are shared.
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


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(bundle: str, new_tokens: int, mode: str) -> dict:
    """One measurement in this process (called with --child)."""
    import time

    sys.path.insert(0, str(ROOT))
    import numpy  # noqa: F401  (imported before the start figure, as onnxruntime is)
    import onnxruntime  # noqa: F401

    from converter import codec, wasm_codec
    from converter.cli import peak_rss_mib
    from converter.bundle import load
    from converter.ort_session import OrtDecoder
    from converter.runtime.chat import ChatModel
    from converter.runtime.generate import SamplingConfig, generate

    start_rss = _rss_mib()
    t0 = time.perf_counter()
    # what open_chat_model does, with a mark once everything but the session is in memory (the manifest, the
    # tokenizer, the wasm codec instantiated): "session" = peak RSS - that mark, onnxruntime's share + the weights
    b = load(bundle)
    chat = ChatModel(b.tokenizer_json(), b.tokenizer_config(), b.manifest["config"], None)
    if codec.available_backend() == "wasm":
        wasm_codec.load()
    ready_rss = _rss_mib()
    chat.session = OrtDecoder(b, **MODES[mode])
    load_s = time.perf_counter() - t0
    ids = chat.tokenizer.encode(PROMPT)[:41]
    res = generate(chat.session, chat.tokenizer, ids, eos_ids=[], cfg=SamplingConfig(max_new_tokens=new_tokens))
    return {"load_s": load_s, "prompt_tokens": len(ids), "new_tokens": len(res.token_ids),
            "prefill_tok_s": res.prefill_tok_s, "decode_tok_s": res.decode_tok_s,
            "peak_rss_mib": peak_rss_mib(), "start_rss_mib": start_rss,
            "ready_rss_mib": ready_rss}


MODES = {"default": {}, "low-memory": {"low_memory": True}, "strict": {"low_memory": "strict"},   # OrtDecoder(**...)
         "int8-compute": {"int8_compute": True},
         # the KV cache written in place (converter/kv_inplace.py), in one session and in the memory modes
         "inplace": {"kv": "inplace"}, "low-memory-inplace": {"low_memory": True, "kv": "inplace"},
         "strict-inplace": {"low_memory": "strict", "kv": "inplace"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", default=str(ROOT / "bundles"))
    ap.add_argument("--schemes", default="f32,int8,int4-g32,ternary")
    ap.add_argument("--modes", default="default,low-memory,strict")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="default", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.new_tokens, args.mode)))
        return 0

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    schemes = args.schemes.split(",")
    for s in schemes:
        if not (Path(args.bundles) / f"smollm2-{s}" / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "converter", "build", "--scheme", s, "--bundles", args.bundles],
                           cwd=ROOT, check=True, env=env)
    sys.path.insert(0, str(ROOT))
    from converter.bundle import load
    from converter.config import LlamaConfig
    from converter.ort_session import session_weight_bytes

    modes = args.modes.split(",")
    if not modes or not set(modes) <= set(MODES):
        ap.error(f"--modes: some of {', '.join(MODES)}, not {args.modes!r}")
    runs: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in schemes for m in modes}
    for rep in range(args.reps):                       # interleaved: every scheme and mode once per round
        for s, mode in runs:
            out = subprocess.run([sys.executable, __file__, "--child", str(Path(args.bundles) / f"smollm2-{s}"),
                                  "--new-tokens", str(args.new_tokens), "--mode", mode],
                                 capture_output=True, text=True, env=env, check=True)
            runs[s, mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {rep + 1}/{args.reps} {s} {mode}: {runs[s, mode][-1]}", file=sys.stderr)

    rows = []
    for (s, mode), measured in runs.items():
        m = json.loads((Path(args.bundles) / f"smollm2-{s}" / "manifest.json").read_text())
        c = LlamaConfig.from_dict(m["config"])
        positions = measured[0]["prompt_tokens"] + measured[0]["new_tokens"]
        kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * positions   # float32 K, V
        # the target divides by the weights as the session holds them (session_weight_bytes: int4-gG's float16
        # scales become float32 there); the bundle's stored bytes (totals.runtime_bytes) are kept for comparison
        row = {"scheme": s, "mode": mode, "stored_weight_mb": m["totals"]["runtime_bytes"] / 1e6,
               "runtime_weight_mb": session_weight_bytes(load(Path(args.bundles) / f"smollm2-{s}")) / 1e6,
               "kv_cache_mb": kv_bytes / 1e6, "bundle_mb": m["totals"]["bundle_bytes"] / 1e6, "runs": measured}
        for r in measured:
            r["above_start_mib"] = r["peak_rss_mib"] - r["start_rss_mib"]
            r["session_mib"] = r["peak_rss_mib"] - r["ready_rss_mib"]
        for k in ("prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mib", "above_start_mib", "session_mib"):
            vals = [r[k] for r in measured]
            row[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        for k in ("above_start", "session"):
            row[f"{k}_ratio"] = row[f"{k}_mib"]["median"] * 1.048576 / (row["runtime_weight_mb"] + row["kv_cache_mb"])
            row[f"{k}_ratio_stored"] = (row[f"{k}_mib"]["median"] * 1.048576
                                        / (row["stored_weight_mb"] + row["kv_cache_mb"]))
        rows.append(row)
    print(f"\n{'scheme':10} {'mode':10} {'prefill tok/s':>18} {'decode tok/s':>16} {'load s':>7} {'peak RSS MiB':>13} "
          f"{'above start':>12} {'ratio':>6} {'session':>8} {'ratio':>6} {'weights+KV MB':>14} "
          f"{'stored-bytes ratio':>19}")
    for r in rows:
        f = lambda k, d=1: f"{r[k]['median']:.{d}f} ({r[k]['min']:.{d}f}–{r[k]['max']:.{d}f})"  # noqa: E731
        print(f"{r['scheme']:10} {r['mode']:10} {f('prefill_tok_s', 0):>18} {f('decode_tok_s'):>16} "
              f"{r['load_s']['median']:7.2f} {r['peak_rss_mib']['median']:13.0f} {r['above_start_mib']['median']:12.0f} "
              f"{r['above_start_ratio']:6.2f} {r['session_mib']['median']:8.0f} {r['session_ratio']:6.2f} "
              f"{r['runtime_weight_mb'] + r['kv_cache_mb']:14.1f} {r['session_ratio_stored']:19.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_tokens": rows[0]["runs"][0]["prompt_tokens"], "new_tokens": args.new_tokens,
                               "threads": 1,
                               "load_average": os.getloadavg(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
