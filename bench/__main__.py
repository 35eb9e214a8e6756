"""Speed and memory of the page against the runtimes users would pick instead, side by side in one run.

    python -m bench [--quick] [--schemes int8,int4-g32,ternary] [--reps 3] [--new-tokens 64] [--out bench/results]

Builds what it needs (bench/prepare.py), then runs every configuration once per round, the rounds interleaved
(A/B/C..., A/B/C...) so that a load spike on these shared machines hits every configuration alike:
  (a) onnxruntime CPU in Python, 1 thread and all cores              bench/ortcpu.py
  (b) the page on the WASM EP, 1 thread and all threads              bench/browser.py run_page
  (c) the page on WebGPU (SwiftShader here, a real GPU elsewhere), KV cache on the device and (before the fix) via
      the CPU
  (d) wllama (llama.cpp in WASM) on the same model's GGUF, 1 thread and all threads, in the same Chromium
  (e) llama-cpp-python: only when installed
and, for load time, the same weights stored uncompressed (bundles/*-packed). Prints tables (medians, min–max),
writes bench/results/bench.json and one PNG per figure. --quick: the tiny random model, one round, a few tokens
(the smoke test runs it). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import browser, llamacpp, ortcpu, prepare, report  # noqa: E402


def configure_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke size: tiny model, one round, 8 tokens")
    ap.add_argument("--schemes", default="int8,int4-g32,ternary", help="SmolLM2 bundles to compare")
    ap.add_argument("--packed", default="int8,ternary",
                    help="schemes whose uncompressed twin is loaded for the LZW-vs-uncompressed comparison")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--webgpu-schemes", default="", help="schemes to run on WebGPU (default: all of --schemes); "
                    "SwiftShader (no GPU) needs seconds per token, so there pick one")
    ap.add_argument("--webgpu-new-tokens", type=int, default=16,
                    help="tokens per WebGPU run (page and wllama); its own count, reported as such")
    ap.add_argument("--bundles", default=str(ROOT / "bundles"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--only", default="", help="comma list of configuration kinds to run "
                    "(ortcpu,page-wasm,page-webgpu,wllama,load); default all")
    ap.add_argument("--skip", default="", help="comma list of configuration key prefixes to leave out, e.g. "
                    "page-wasm/ternary/t2,wllama/webgpu")
    ap.add_argument("--seed", type=int, default=0, help="order of the configurations within a round")
    ap.add_argument("--report", metavar="JSON", help="measure nothing: summarise the runs of an earlier bench.json "
                    "again (e.g. one stopped after some rounds), print the tables and redraw the figures")
    return ap


# ---------------------------------------------------------------------------------------------------------------
# The run matrix: one Job per configuration, each run once per round
# ---------------------------------------------------------------------------------------------------------------

def jobs_for(ws: prepare.Workspace, quick: bool, all_threads: int, with_llamacpp: bool,
             webgpu_schemes: list[str], webgpu_tokens: int) -> list[dict]:
    """Every configuration of the run. `key` names it in the results; `kind` says which runner runs it."""
    jobs = []
    schemes = ws.schemes
    for s in schemes:
        b = f"{ws.model}-{s}"
        for t in ([1] if quick else [1, all_threads]):
            jobs.append({"key": f"ortcpu/{s}/t{t}", "kind": "ortcpu", "scheme": s, "bundle": b, "threads": t})
            # each with its return visit (warm reload): its load and its first reply (V8's code cache)
            jobs.append({"key": f"page-wasm/{s}/t{t}", "kind": "page-wasm", "scheme": s, "bundle": b, "ep": "wasm",
                         "threads": t, "warm": True})
        if not quick and s == schemes[0]:            # the yield fix, A/B: the old wait for a frame per token
            jobs.append({"key": f"page-wasm/{s}/t1/yield-frame", "kind": "page-wasm", "scheme": s, "bundle": b,
                         "ep": "wasm", "threads": 1, "yield": "frame", "warm": False})
        if not quick and s in webgpu_schemes:
            for kv in ("gpu", "cpu"):                # the WebGPU KV fix, A/B in the same rounds
                jobs.append({"key": f"page-webgpu/{s}/kv-{kv}", "kind": "page-webgpu", "scheme": s, "bundle": b,
                             "ep": "webgpu", "threads": 0, "kv": kv, "warm": False, "new_tokens": webgpu_tokens})
    for s, name in ws.packed.items():
        jobs.append({"key": f"load/{s}-packed", "kind": "load", "scheme": s, "bundle": name, "ep": "wasm",
                     "threads": 1, "warm": not quick, "new_tokens": 1})
    for t in ([1] if quick else [1, all_threads]):
        jobs.append({"key": f"wllama/wasm/t{t}", "kind": "wllama", "threads": t, "gpu_layers": 0})
    if not quick:
        jobs.append({"key": f"wllama/webgpu/t{all_threads}", "kind": "wllama", "threads": all_threads,
                     "gpu_layers": 999, "new_tokens": webgpu_tokens})
    if with_llamacpp:
        for t in ([1] if quick else [1, all_threads]):
            jobs.append({"key": f"llamacpp/native/t{t}", "kind": "llamacpp", "threads": t})
    return jobs


def run_job(job: dict, ws: prepare.Workspace, server: str, new_tokens: int) -> dict:
    n = job.get("new_tokens", new_tokens)
    if job["kind"] == "ortcpu":
        return ortcpu.run(ws.bundles[job["bundle"]], job["threads"], ws.prompt, n)
    if job["kind"] == "llamacpp":
        return llamacpp.run(ws.gguf_path, job["threads"], ws.prompt, n)
    if job["kind"] == "wllama":
        return browser.run_wllama(server, ws.gguf_url, job["threads"], job["gpu_layers"], ws.prompt, n,
                                  ws.ban_tokens)
    return browser.run_page(server, job["bundle"], job["ep"], job["threads"], ws.prompt, n,
                            kv=job.get("kv"), yield_mode=job.get("yield"), warm=job["warm"])


def report_again(path: Path, args, console, out: Path) -> int:
    old = json.loads(path.read_text())
    schemes = args.schemes.split(",")
    ws = prepare.prepare_smollm2(Path(args.bundles), schemes, [s for s in args.packed.split(",") if s in schemes],
                                 log=console.print)
    runs = old["runs"]
    old["meta"]["rounds_done"] = len({r["round"] for r in runs})
    doc = {"meta": old["meta"], "summary": report.summarize(runs, ws), "runs": runs}
    path.write_text(json.dumps(doc, indent=1, default=float))
    report.print_tables(console, doc)
    pngs = report.plot_all(doc, out)
    (out / "bench.md").write_text(report.markdown(doc))
    console.print(f"rewrote {path}, {out / 'bench.md'} and {', '.join(p.name for p in pngs)}")
    return 0


def write_json(path: Path, args, ws, reps: int, new_tokens: int, t_start: float, llama_skip: str | None,
               runs: list[dict], rounds_done: int) -> dict:
    doc = {
        "meta": {"model": ws.model, "quick": args.quick, "reps": reps, "rounds_done": rounds_done,
                 "new_tokens": new_tokens, "webgpu_new_tokens": args.webgpu_new_tokens, "argv": sys.argv[1:],
                 "prompt": ws.prompt, "prompt_tokens_target": prepare.PROMPT_TOKENS if not args.quick else None,
                 "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "chromium": browser.chromium_version(), "gguf": ws.gguf_type,
                 "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
                 "seconds": time.time() - t_start, "llama_cpp_python": llama_skip or "included"},
        "summary": report.summarize(runs, ws),
        "runs": runs,
    }
    path.write_text(json.dumps(doc, indent=1, default=float))
    return doc


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    console = report.console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reason = browser.skip_reason()
    if reason:
        console.print(f"[red]cannot run the browser part: {reason}[/]")
        return 2
    all_threads = os.cpu_count() or 1
    if args.report:
        return report_again(Path(args.report), args, console, out)
    scratch = None
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="tiny-qmoe-bench-"))
        ws = prepare.prepare_tiny(scratch, ["int8"], log=console.print)
        reps, new_tokens = 1, min(args.new_tokens, 8)
    else:
        schemes = args.schemes.split(",")
        packed = [s for s in args.packed.split(",") if s in schemes]
        ws = prepare.prepare_smollm2(Path(args.bundles), schemes, packed, log=console.print)
        reps, new_tokens = args.reps, args.new_tokens
    llama_skip = llamacpp.probe(ws.gguf_path, ws.prompt)
    console.print(f"llama-cpp-python: {'included' if llama_skip is None else 'skipped: ' + llama_skip}")
    jobs = jobs_for(ws, args.quick, all_threads, with_llamacpp=llama_skip is None,
                    webgpu_schemes=args.webgpu_schemes.split(",") if args.webgpu_schemes else ws.schemes,
                    webgpu_tokens=args.webgpu_new_tokens)
    if args.only:
        kinds = set(args.only.split(","))
        jobs = [j for j in jobs if j["kind"] in kinds]
    if args.skip:
        jobs = [j for j in jobs if not j["key"].startswith(tuple(args.skip.split(",")))]
    rng = random.Random(args.seed)
    runs: list[dict] = []
    t_start = time.time()
    name = "bench-quick.json" if args.quick else "bench.json"
    try:
        with browser.Server(ws.bundle_dir) as server:
            for rep in range(reps):
                if rep:       # after every round: the rounds so far, summarised (a long run can be stopped)
                    write_json(out / name, args, ws, reps, new_tokens, t_start, llama_skip, runs, rep)
                order = jobs[:]
                rng.shuffle(order)
                for i, job in enumerate(order):
                    t0 = time.perf_counter()
                    try:
                        res = run_job(job, ws, server, new_tokens)
                        err = None
                    except Exception as e:  # one failing configuration must not lose the others' numbers
                        res, err = {}, f"{type(e).__name__}: {str(e)[:500]}"
                    runs.append({**job, "round": rep, "seconds": time.perf_counter() - t0, "error": err,
                                 "load_average": os.getloadavg(), "result": res})
                    status = f"[red]{err}[/]" if err else report.one_line(job, res)
                    console.print(f"round {rep + 1}/{reps} {i + 1:2d}/{len(order)} {job['key']:28s} "
                                  f"{time.perf_counter() - t0:6.1f} s  {status}")
        doc = write_json(out / name, args, ws, reps, new_tokens, t_start, llama_skip, runs, reps)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    report.print_tables(console, doc)
    pngs = report.plot_all(doc, out, prefix="quick-" if args.quick else "")
    (out / name.replace(".json", ".md")).write_text(report.markdown(doc))
    console.print(f"wrote {out / name} and {', '.join(p.name for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
