"""Summaries (median, min–max per configuration), ratios against the targets, rich tables and the PNG figures."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

# issue 8's targets
TARGET_WASM_VS_ORT = 0.8        # page WASM decode ≥ 0.8× onnxruntime CPU at equal threads
TARGET_VS_WLLAMA = 1.5          # page ≥ 1.5× wllama at the same bits/weight tier
TARGET_LZW_TTFT = 0.20          # LZW decode adds ≤ 20 % to time-to-first-token vs the same weights uncompressed
TARGET_MEMORY = 1.3             # memory ≤ 1.3× runtime weight bytes
# our scheme -> the GGUF type of the same bits/weight tier: Q4_1 is 5 bits a weight (SmolLM2's GGUF, with its Q8_0
# embedding, 5.85 all-in); int4-g32, int4-g64 and int4-m32 bundles are 4.86, 4.61 and 4.66 all-in, requantized from
# it (KL 0.15, 0.19 and 0.16 against the float model, smoothed; wllama runs the Q4_1 weights themselves)
SAME_TIER = {"int4-g32": "Q4_1", "int4-g64": "Q4_1", "int4-m32": "Q4_1", "int4-m64": "Q4_1"}

MIB = 1 << 20


def console():
    from rich.console import Console

    return Console(width=160)


def stats(vals: list[float]) -> dict | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


# ---------------------------------------------------------------------------------------------------------------
# Per-run metrics (one flat dict per run, whatever the runner)
# ---------------------------------------------------------------------------------------------------------------

def _first_token_ms(gen: dict, ready_at: float) -> float:
    """From "ready" to the first token. Since session 25 (runs with askedAt) everything in between counts: the
    harness noticing "ready" and calling generate() (tens of ms) and, with the page's warm-up running then, the
    rest of its current step (the call is taken up only between two steps), the tokenizer, the prefill. Earlier
    runs: from the first run's start."""
    p = gen["profile"]
    return p["firstTokenAt"] - ready_at if "askedAt" in p else p["firstTokenAt"] - p["startAt"]


def load_stages(timings: dict, gen: dict) -> dict:
    """Navigation -> first token, split. Download overlaps LZW decoding (chunks decode as their bytes arrive);
    Pyodide starts at navigation, in parallel, so only the wait for it after the session is on the path."""
    first_token = _first_token_ms(gen, timings["readyAt"])
    return {
        "page_start_ms": timings["loadStartAt"],                       # HTML, modules, bundle list
        "download_ms": timings["downloadMs"],                          # manifest + blobs (decoding meanwhile)
        "decode_after_download_ms": timings["decodeAfterDownloadMs"],
        "verify_rest_ms": timings["totalMs"] - timings["downloadMs"] - timings["decodeAfterDownloadMs"],
        "session_ms": timings["sessionMs"],
        "python_wait_ms": timings["pythonWaitMs"],
        "first_token_ms": first_token,
        "ttft_ms": timings["readyAt"] + first_token,
        "decode_busy_ms": timings["decodeMs"],                         # first chunk queued -> last decoded
        "pyodide_start_ms": timings["pyStartMs"],
    }


def page_metrics(res: dict) -> dict:
    g = res["generate"]
    p = g["profile"]
    decode_steps = max(p["steps"] - 1, 0)
    wall_decode_ms = g["totalMs"] - (p["firstTokenAt"] - p["startAt"])
    s = p["session"]
    m = {"prefill_tok_s": g["prefillTokS"], "decode_tok_s": g["decodeTokS"] or None,
         # the next reply of the same load (runs before session 24 have none)
         "decode_again_tok_s": (res.get("generate_again") or {}).get("decodeTokS") or None,
         # the first reply of a return visit, V8's code cache in the profile (runs before session 25 have none:
         # their reload generated one token)
         "decode_return_tok_s": (res.get("warm_generate") or {}).get("decodeTokS") or None,
         "e2e_decode_tok_s": decode_steps / (wall_decode_ms / 1000) if decode_steps else None,
         "prompt_tokens": g["promptTokens"], "new_tokens": len(g["tokens"]), "ep": res["ep"],
         "threads": res["threads"]}
    if decode_steps:       # means per decode step (the prefill call is profiled apart, in prefillSession)
        per = lambda v: v / decode_steps  # noqa: E731
        m["per_token_ms"] = {"run": per(s["runMs"]), "feeds": per(s["feedsMs"]), "kv": per(s["kvMs"]),
                             "logits": per(s["logitsMs"]), "topk": per(s["topkMs"]),
                             "python": per(p["pushMs"]), "yield": per(p["yieldMs"])}
    m["cold"] = load_stages(res["cold"], g)
    if "warm" in res:
        m["warm"] = load_stages(res["warm"], res["warm_generate"])
    mem, pm = res["memory"], res["page_memory"]
    m["memory"] = {"peak_pss_mib": mem["peak_mib"], "peak_load_pss_mib": mem["peak_load_mib"],
                   "idle_pss_mib": mem["idle_mib"], "peak_above_idle_mib": mem["peak_mib"] - mem["idle_mib"],
                   "ua_memory_mib": pm["uaMemory"] / MIB if "uaMemory" in pm else None,
                   "pyodide_heap_mib": pm["pyodideHeap"] / MIB if "pyodideHeap" in pm else None,
                   # the API's total leaves out Pyodide's (non-shared) heap: bench/ua_memory_wasm.py
                   "page_memory_mib": ((pm["uaMemory"] + pm.get("pyodideHeap", 0)) / MIB
                                       if "uaMemory" in pm else None)}
    return m


def wllama_metrics(res: dict) -> dict:
    g, ld = res["generate"], res["load"]
    return {"prefill_tok_s": g["prefillTokS"], "decode_tok_s": g["decodeTokS"],
            "decode_again_tok_s": (res.get("generate_again") or {}).get("decodeTokS") or None,
            "decode_return_tok_s": (res.get("generate_return") or {}).get("decodeTokS") or None,
            "prompt_tokens": g["promptTokens"], "new_tokens": g["newTokens"], "threads": res["threads"],
            "load_ms": ld["fetchMs"] + ld["initMs"], "ttft_ms": ld["readyAt"] + g["promptMs"],
            "memory": {"peak_pss_mib": res["memory"]["peak_mib"], "idle_pss_mib": res["memory"]["idle_mib"],
                       "peak_above_idle_mib": res["memory"]["peak_mib"] - res["memory"]["idle_mib"],
                       "ua_memory_mib": res["page_memory"]["uaMemory"] / MIB
                       if "uaMemory" in res["page_memory"] else None}}


def ortcpu_metrics(res: dict) -> dict:
    """onnxruntime CPU (bench/ortcpu.py) and llama.cpp native (bench/llamacpp.py) report the same fields."""
    return {k: res.get(k) for k in ("prefill_tok_s", "decode_tok_s", "e2e_decode_tok_s", "first_token_ms", "load_s",
                                    "peak_rss_mib", "prompt_tokens", "new_tokens", "threads")}


def metrics(run: dict) -> dict:
    if run["kind"] in ("ortcpu", "llamacpp"):
        return ortcpu_metrics(run["result"])
    if run["kind"] == "wllama":
        return wllama_metrics(run["result"])
    return page_metrics(run["result"])


def one_line(job: dict, res: dict) -> str:
    m = metrics({**job, "result": res})
    parts = [f"prefill {m['prefill_tok_s']:.1f}"]
    if m.get("decode_tok_s"):
        parts.append(f"decode {m['decode_tok_s']:.2f} tok/s")
    if "cold" in m:
        parts.append(f"ttft cold {m['cold']['ttft_ms'] / 1000:.2f} s")
    if "warm" in m:
        parts.append(f"warm {m['warm']['ttft_ms'] / 1000:.2f} s")
    if "ep" in m and m["ep"] != job.get("ep"):
        parts.append(f"[yellow]ran on {m['ep']}[/]")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Summary: stats per configuration, then the ratios
# ---------------------------------------------------------------------------------------------------------------

def _stats_tree(ms: list[dict]) -> dict:
    """Field-wise stats over a list of metric dicts (nested dicts recurse; strings keep the first value)."""
    out = {}
    for k, v in ms[0].items():
        if isinstance(v, dict):
            out[k] = _stats_tree([m[k] for m in ms if isinstance(m.get(k), dict)])
        elif isinstance(v, (int, float)) or v is None:
            out[k] = stats([m.get(k) for m in ms])
        else:
            out[k] = v
    return out


def runtime_bytes(ws, name: str) -> int:
    return json.loads((ws.bundles[name] / "manifest.json").read_text())["totals"]["runtime_bytes"]


def session_bytes(ws, name: str) -> dict:
    """The weights as a session holds them (ort_session.session_weight_bytes), what the memory targets divide by:
    "graph" for onnxruntime CPU (model.onnx), "page" for the page on the WASM EP (its wasm graph when it has one)."""
    from converter.bundle import load
    from converter.ort_session import session_weight_bytes

    b = load(ws.bundles[name])
    return {"graph": session_weight_bytes(b, "graph"),
            "page": session_weight_bytes(b, "graph_wasm" if "graph_wasm" in b.manifest else "graph")}


def _med(summary: dict, key: str, *path: str) -> float | None:
    node = summary["configs"].get(key)
    for p in path:
        if node is None:
            return None
        node = node.get(p)
    return node["median"] if node else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: list[dict], ws) -> dict:
    by_key: dict[str, list[dict]] = {}
    errors: dict[str, list[str]] = {}
    for r in runs:
        if r["error"]:
            errors.setdefault(r["key"], []).append(r["error"])
            continue
        by_key.setdefault(r["key"], []).append(metrics(r))
    s = {"configs": {k: _stats_tree(v) for k, v in by_key.items()}, "errors": errors,
         "weights_bytes": {n: runtime_bytes(ws, n) for n in ws.bundles},
         "session_weights_bytes": {n: session_bytes(ws, n) for n in ws.bundles},
         "bundle_bytes": {n: json.loads((p / "manifest.json").read_text())["totals"]["bundle_bytes"]
                          for n, p in ws.bundles.items()},
         "gguf_bytes": ws.gguf_path.stat().st_size if ws.gguf_path else None}
    s["targets"] = targets(s, ws)
    return s


def targets(s: dict, ws) -> dict:
    keys = s["configs"].keys()
    threads = sorted({int(k.rsplit("/t", 1)[1]) for k in keys if k.startswith("ortcpu/")})
    t_all = max(threads) if threads else 1
    out = {"wasm_vs_ortcpu": [], "vs_wllama": [], "lzw_ttft": [], "memory": [], "fixes": []}
    for sch in ws.schemes:
        for t in threads:
            if f"page-wasm/{sch}/t{t}" not in keys:
                continue
            for what in ("decode_tok_s", "prefill_tok_s"):
                r = _ratio(_med(s, f"page-wasm/{sch}/t{t}", what), _med(s, f"ortcpu/{sch}/t{t}", what))
                out["wasm_vs_ortcpu"].append({"scheme": sch, "threads": t, "metric": what, "ratio": r,
                                              "target": TARGET_WASM_VS_ORT,
                                              "met": r is not None and r >= TARGET_WASM_VS_ORT})
        for t in threads:
            if f"page-wasm/{sch}/t{t}" not in keys:
                continue
            for what in ("decode_tok_s", "decode_again_tok_s", "decode_return_tok_s", "prefill_tok_s"):
                r = _ratio(_med(s, f"page-wasm/{sch}/t{t}", what), _med(s, f"wllama/wasm/t{t}", what))
                if r is None and what in ("decode_again_tok_s", "decode_return_tok_s"):
                    continue
                out["vs_wllama"].append({"scheme": sch, "wllama": ws.gguf_type, "threads": t, "metric": what,
                                         "same_tier": sch in SAME_TIER, "ratio": r, "target": TARGET_VS_WLLAMA,
                                         "met": r is not None and r >= TARGET_VS_WLLAMA})
        name = f"{ws.model}-{sch}"
        held = s.get("session_weights_bytes", {}).get(name) or {}     # older summaries: the stored bytes
        weights = held.get("page", s["weights_bytes"][name]) / MIB
        for key in dict.fromkeys((f"page-wasm/{sch}/t1", f"page-wasm/{sch}/t{t_all}")):
            if key not in keys:
                continue
            ua = _med(s, key, "memory", "ua_memory_mib")
            page = _med(s, key, "memory", "page_memory_mib")       # the API's total + Pyodide's heap
            above = _med(s, key, "memory", "peak_above_idle_mib")
            out["memory"].append({"config": key, "weights_mib": weights, "ua_memory_ratio": _ratio(ua, weights),
                                  "page_memory_ratio": _ratio(page, weights),
                                  "peak_above_idle_ratio": _ratio(above, weights), "target": TARGET_MEMORY,
                                  "met": page is not None and page / weights <= TARGET_MEMORY})
        rss = _med(s, f"ortcpu/{sch}/t1", "peak_rss_mib")
        weights = held.get("graph", s["weights_bytes"][name]) / MIB
        # the whole process (Python, numpy, the tokenizer) in one session, the speed default; the target's own
        # measure, the session's share under --strict-memory, is bench/generate.py's (README)
        out["memory"].append({"config": f"ortcpu/{sch}/t1 (whole process, one session; --strict-memory: "
                                        "bench/generate.py)", "weights_mib": weights,
                              "peak_rss_ratio": _ratio(rss, weights), "target": TARGET_MEMORY,
                              "met": rss is not None and rss / weights <= TARGET_MEMORY})
        for what in ("decode_tok_s", "e2e_decode_tok_s", "prefill_tok_s"):
            after, before = (_med(s, f"page-webgpu/{sch}/kv-gpu", what), _med(s, f"page-webgpu/{sch}/kv-cpu", what))
            if after is not None and before is not None:
                out["fixes"].append({"fix": "WebGPU: KV cache stays in GPU buffers", "scheme": sch, "metric": what,
                                     "before": before, "after": after, "speedup": after / before})
        after = _med(s, f"page-wasm/{sch}/t1", "e2e_decode_tok_s")
        before = _med(s, f"page-wasm/{sch}/t1/yield-frame", "e2e_decode_tok_s")
        if after is not None and before is not None:
            out["fixes"].append({"fix": "yield to the page by a macrotask, not a frame", "scheme": sch,
                                 "metric": "e2e_decode_tok_s", "before": before, "after": after,
                                 "speedup": after / before})
    for sch, packed in ws.packed.items():
        lzw_key = next((k for k in (f"page-wasm/{sch}/t1", f"page-wasm/{sch}/t{t_all}")
                        if k in keys and "warm" in s["configs"][k]), None)
        for phase in ("cold", "warm"):
            a = _med(s, lzw_key, phase, "ttft_ms") if lzw_key else None
            b = _med(s, f"load/{sch}-packed", phase, "ttft_ms")
            r = _ratio(a, b)
            out["lzw_ttft"].append({"scheme": sch, "phase": phase, "lzw_ms": a, "packed_ms": b,
                                    "added": r - 1 if r is not None else None, "target": TARGET_LZW_TTFT,
                                    "met": r is not None and r - 1 <= TARGET_LZW_TTFT})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def fmt(st: dict | None, d: int = 1, scale: float = 1.0) -> str:
    if not st:
        return "–"
    if st["n"] == 1:
        return f"{st['median'] * scale:.{d}f}"
    return f"{st['median'] * scale:.{d}f} ({st['min'] * scale:.{d}f}–{st['max'] * scale:.{d}f})"


def _get(node: dict | None, *path: str):
    for p in path:
        if not isinstance(node, dict):
            return None
        node = node.get(p)
    return node


def print_tables(con, doc: dict) -> None:
    from rich.table import Table

    s = doc["summary"]
    cfg = s["configs"]
    t = Table(title=f"Token speed, {doc['meta']['model']}: {doc['meta']['new_tokens']} greedy tokens after the prompt, "
                    f"median (min–max) of {doc['meta']['reps']} interleaved rounds")
    for c in ("configuration", "runs on", "prompt tok", "prefill tok/s", "decode tok/s", "decode incl. loop tok/s",
              "next reply", "return visit"):
        t.add_column(c, justify="left" if c == "configuration" else "right")
    for k in sorted(cfg):
        if k.startswith("load/"):
            continue
        m = cfg[k]
        t.add_row(k, str(m.get("ep", "cpu" if k.startswith(("ortcpu", "llamacpp")) else
                                "wasm" if "wasm" in k else "webgpu")),
                  fmt(m.get("prompt_tokens"), 0), fmt(m.get("prefill_tok_s")), fmt(m.get("decode_tok_s"), 2),
                  fmt(m.get("e2e_decode_tok_s"), 2), fmt(m.get("decode_again_tok_s"), 2),
                  fmt(m.get("decode_return_tok_s"), 2))
    con.print(t)

    t = Table(title="Load: navigation -> first token, seconds, median (min–max); cold = fresh browser, "
                    "warm = reload, a return visit (Cache API, HTTP cache, V8 code cache)")
    cols = ("page_start_ms", "download_ms", "decode_after_download_ms", "verify_rest_ms", "session_ms",
            "python_wait_ms", "first_token_ms", "ttft_ms")
    for c in ("configuration", "phase") + tuple(c.removesuffix("_ms") for c in cols):
        t.add_column(c, justify="left" if c in ("configuration", "phase") else "right")
    for k in sorted(cfg):
        for phase in ("cold", "warm"):
            if phase in cfg[k]:
                t.add_row(k, phase, *(fmt(cfg[k][phase][c], 2, 1e-3) for c in cols))
    con.print(t)

    t = Table(title="Memory, MiB: Chromium = PSS of all its processes (peak, and above the idle browser); "
                    "page = measureUserAgentSpecificMemory after generating + Pyodide's heap, which that API "
                    "leaves out; ORT CPU = peak RSS")
    for c in ("configuration", "stored weights", "peak", "peak above idle", "UA memory API", "Pyodide heap",
              "page"):
        t.add_column(c, justify="left" if c == "configuration" else "right")
    weights = s["weights_bytes"]
    for k in sorted(cfg):
        m = cfg[k]
        name = next((n for n in weights if f"/{n.split('-', 1)[1]}/" in f"/{k.split('/', 1)[1]}/"
                     or k == f"load/{n.split('-', 1)[1]}"), None)
        w = f"{weights[name] / MIB:.0f}" if name else (f"{s['gguf_bytes'] / MIB:.0f} (GGUF)" if "wllama" in k else "–")
        if k.startswith(("ortcpu/", "llamacpp/")):
            t.add_row(k, w, fmt(m["peak_rss_mib"], 0), "–", "–", "–", "–")
        elif "memory" in m:
            mm = m["memory"]
            t.add_row(k, w, fmt(mm.get("peak_pss_mib"), 0), fmt(mm.get("peak_above_idle_mib"), 0),
                      fmt(mm.get("ua_memory_mib"), 0), fmt(mm.get("pyodide_heap_mib"), 0),
                      fmt(mm.get("page_memory_mib"), 0))
    con.print(t)

    t = Table(title="Where a decode step goes in the page, ms per token (median over runs of the mean per step)")
    parts = ("run", "feeds", "kv", "logits", "topk", "python", "yield")
    for c in ("configuration",) + parts:
        t.add_column(c, justify="left" if c == "configuration" else "right")
    for k in sorted(cfg):
        if "per_token_ms" in cfg[k]:
            t.add_row(k, *(fmt(cfg[k]["per_token_ms"][p], 2) for p in parts))
    con.print(t)

    tg = s["targets"]
    t = Table(title="Targets (ratios of medians)")
    for c in ("target", "configuration", "ratio", "met"):
        t.add_column(c)
    yes = lambda ok: "[green]yes[/]" if ok else "[red]no[/]"  # noqa: E731
    for r in tg["wasm_vs_ortcpu"]:
        t.add_row(f"page WASM ≥ {r['target']}× ORT CPU", f"{r['scheme']} {r['threads']} thr {r['metric']}",
                  _r(r["ratio"]), yes(r["met"]))
    for r in tg["vs_wllama"]:
        tier = "same tier" if r["same_tier"] else "other tier"
        t.add_row(f"page ≥ {r['target']}× wllama", f"{r['scheme']} vs {r['wllama']} ({tier}) {r['threads']} thr "
                  f"{r['metric']}", _r(r["ratio"]), yes(r["met"]))
    for r in tg["lzw_ttft"]:
        t.add_row(f"LZW adds ≤ {100 * r['target']:.0f}% to TTFT", f"{r['scheme']} {r['phase']}",
                  "–" if r["added"] is None else f"{100 * r['added']:+.1f}%", yes(r["met"]))
    for r in tg["memory"]:
        ratio = r.get("page_memory_ratio", r.get("peak_rss_ratio"))
        extra = f" (peak PSS above idle {_r(r['peak_above_idle_ratio'])}×)" if "peak_above_idle_ratio" in r else ""
        t.add_row(f"memory ≤ {r['target']}× weights", r["config"] + extra, _r(ratio), yes(r["met"]))
    for r in tg["fixes"]:
        t.add_row(f"fix: {r['fix']}", f"{r['scheme']} {r['metric']}: {r['before']:.2f} -> {r['after']:.2f}",
                  _r(r["speedup"]), "")
    con.print(t)
    if s["errors"]:
        for k, errs in s["errors"].items():
            con.print(f"[red]{k}: {len(errs)} failed run(s): {errs[0]}[/]")
    con.print(f"llama-cpp-python: {doc['meta']['llama_cpp_python']}")


def _r(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Figures (one PNG each)
# ---------------------------------------------------------------------------------------------------------------

def plot_all(doc: dict, out: Path, prefix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    for fn in (plot_speed, plot_load, plot_memory, plot_profile, plot_warmup):
        p = fn(doc, out / f"{prefix}{fn.__name__.removeprefix('plot_')}.png")
        if p is not None:
            paths.append(p)
    return paths


def _bars(ax, labels, stats_list, title, color=None):
    import numpy as np

    med = [st["median"] if st else 0 for st in stats_list]
    lo = [st["median"] - st["min"] if st else 0 for st in stats_list]
    hi = [st["max"] - st["median"] if st else 0 for st in stats_list]
    y = np.arange(len(labels))
    ax.barh(y, med, xerr=[lo, hi], color=color, capsize=3)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    for yi, v in zip(y, med):
        ax.text(v, yi, f" {v:.1f}", va="center", fontsize=7)


def _save(fig, path: Path) -> Path:
    """Lay out, write as PNG and close a figure (every plot of this module)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(doc: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    cfg = doc["summary"]["configs"]
    keys = [k for k in sorted(cfg) if not k.startswith("load/")]
    if not keys:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(keys) + 1.5))
    _bars(axes[0], keys, [cfg[k].get("prefill_tok_s") for k in keys], "prefill tok/s (median, min–max)", "#4c72b0")
    _bars(axes[1], keys, [cfg[k].get("decode_tok_s") for k in keys], "decode tok/s (median, min–max)", "#dd8452")
    fig.suptitle(f"{doc['meta']['model']}: token speed, {doc['meta']['reps']} interleaved rounds", fontsize=10)
    return _save(fig, path)


def plot_warmup(doc: dict, path: Path) -> Path | None:
    """Each decode step's session.forward time in the page's first reply after a load, its next reply and a return
    visit's first reply (median over rounds per step): V8 compiles the hot wasm functions with its optimizing tier
    while the first reply runs, and a return visit takes them from the code cache."""
    import statistics

    import matplotlib.pyplot as plt

    replies = (("generate", "first reply after a load", "#c44e52"), ("generate_again", "the next reply", "#4c72b0"),
               ("warm_generate", "a return visit's first reply", "#55a868"))
    by_key: dict[str, dict[str, list[list[float]]]] = {}
    for r in doc["runs"]:
        if r["error"] or r["kind"] != "page-wasm" or r["key"].count("/") != 2:    # no variants (yield-frame, ...)
            continue
        for field_, _, _ in replies:
            steps = ((r["result"].get(field_) or {}).get("profile") or {}).get("stepMs")
            if steps:
                by_key.setdefault(r["key"], {}).setdefault(field_, []).append(steps)
    if not by_key:
        return None
    keys = sorted(by_key)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], keys):
        for field_, label, color in replies:
            runs = by_key[k].get(field_)
            if not runs:
                continue
            n = min(len(x) for x in runs)
            ax.plot(range(1, n + 1), [statistics.median(x[i] for x in runs) for i in range(n)], label=label,
                    color=color, lw=1.2)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("decode step")
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("ms per step (median over rounds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("The page's decode steps: the first reply after a load warms V8 up", fontsize=10)
    return _save(fig, path)


def plot_load(doc: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    cfg = doc["summary"]["configs"]
    rows = [(k, ph) for k in sorted(cfg) for ph in ("cold", "warm") if ph in cfg[k] and "warm" in cfg[k]]
    if not rows:
        return None
    parts = ("page_start_ms", "download_ms", "decode_after_download_ms", "verify_rest_ms", "session_ms",
             "python_wait_ms", "first_token_ms")
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.6))
    for i, (k, ph) in enumerate(rows):
        left = 0.0
        for j, p in enumerate(parts):
            v = cfg[k][ph][p]["median"] / 1000
            ax.barh(i, v, left=left, color=plt.cm.tab10(j), label=p.removesuffix("_ms") if i == 0 else None)
            left += v
        ax.text(left, i, f" {cfg[k][ph]['ttft_ms']['median'] / 1000:.1f} s", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{k} {ph}" for k, ph in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from navigation (medians; Pyodide starts in parallel, only its wait is shown)")
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    ax.set_title("Load: navigation -> first token", fontsize=10)
    return _save(fig, path)


def plot_memory(doc: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    runs = [r for r in doc["runs"] if not r["error"] and r["kind"] == "page-wasm" and r["result"].get("warm")]
    if not runs:
        return None
    r = runs[0]
    tl = r["result"]["memory"]["timeline"]
    fig, ax = plt.subplots(figsize=(10, 4))
    for k, color in (("total", "black"), ("renderer", "#4c72b0"), ("gpu", "#55a868"), ("browser", "#c44e52"),
                     ("utility", "#8172b2")):
        ax.plot([s["t"] for s in tl], [s[k] for s in tl], label=k, color=color, lw=1.2)
    w = doc["summary"]["weights_bytes"].get(r["bundle"])
    if w:
        ax.axhline(w / MIB, ls="--", color="grey", lw=1, label=f"stored weights ({w / MIB:.0f} MiB)")
    for t, label in r["result"]["memory"]["marks"]:
        if t <= tl[-1]["t"]:
            ax.axvline(t, color="grey", lw=0.6, ls=":")
            ax.text(t, ax.get_ylim()[1] * 0.97, label, rotation=90, fontsize=7, va="top")
    ax.set_xlabel("seconds since navigation")
    ax.set_ylabel("PSS MiB")
    ax.set_title(f"Chromium memory while loading and generating: {r['key']} (round {r['round'] + 1})", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_profile(doc: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    cfg = doc["summary"]["configs"]
    keys = [k for k in sorted(cfg) if "per_token_ms" in cfg[k]]
    if not keys:
        return None
    parts = ("run", "feeds", "kv", "logits", "topk", "python", "yield")
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(keys) + 1.5))
    for i, k in enumerate(keys):
        left = 0.0
        for j, p in enumerate(parts):
            v = cfg[k]["per_token_ms"][p]["median"]
            ax.barh(i, v, left=left, color=plt.cm.tab10(j), label=p if i == 0 else None)
            left += v
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per generated token (run = onnxruntime-web session.run)")
    ax.legend(fontsize=7, ncol=7)
    ax.set_title("The page's per-token loop", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Markdown (the README's tables are pasted from bench/results/bench.md)
# ---------------------------------------------------------------------------------------------------------------

def markdown(doc: dict) -> str:
    s = doc["summary"]
    cfg = s["configs"]
    meta = doc["meta"]
    rounds = meta.get("rounds_done", meta["reps"])
    lines = [f"Token speed — {meta['model']}, prompt {meta.get('prompt_tokens_target') or '?'} tokens, "
             f"{meta['new_tokens']} greedy tokens (WebGPU: {meta.get('webgpu_new_tokens')}), median (min–max) of "
             f"{rounds} interleaved rounds:", "",
             "| configuration | runs on | prefill tok/s | decode tok/s | decode incl. page loop tok/s | decode, the "
             "next reply tok/s | decode, a return visit's first reply tok/s |",
             "|---|---|---|---|---|---|---|"]
    for k in sorted(cfg):
        if k.startswith("load/"):
            continue
        m = cfg[k]
        on = m.get("ep") or ("cpu" if k.startswith(("ortcpu", "llamacpp")) else "wasm" if "wasm" in k else "webgpu")
        lines.append(f"| {k} | {on} | {fmt(m.get('prefill_tok_s'))} | {fmt(m.get('decode_tok_s'), 2)} | "
                     f"{fmt(m.get('e2e_decode_tok_s'), 2)} | {fmt(m.get('decode_again_tok_s'), 2)} | "
                     f"{fmt(m.get('decode_return_tok_s'), 2)} |")
    cols = ("page_start_ms", "download_ms", "decode_after_download_ms", "verify_rest_ms", "session_ms",
            "python_wait_ms", "first_token_ms", "ttft_ms")
    lines += ["", "Load, seconds from navigation (cold: a first visit; warm: a return visit):", "",
              "| bundle | phase | " + " | ".join(c.removesuffix("_ms").replace("_", " ") for c in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for k in sorted(cfg):
        for ph in ("cold", "warm"):
            if ph in cfg[k] and "warm" in cfg[k]:
                lines.append(f"| {k} | {ph} | " + " | ".join(fmt(cfg[k][ph][c], 2, 1e-3) for c in cols) + " |")
    lines += ["", "Memory, MiB:", "",
              "| configuration | Chromium PSS peak | peak above idle browser | UA memory API | Pyodide heap "
              "| page (the two) | ORT CPU peak RSS |", "|---|---|---|---|---|---|---|"]
    for k in sorted(cfg):
        m = cfg[k]
        if k.startswith(("ortcpu/", "llamacpp/")):
            lines.append(f"| {k} | – | – | – | – | – | {fmt(m['peak_rss_mib'], 0)} |")
        elif "memory" in m:
            mm = m["memory"]
            lines.append(f"| {k} | {fmt(mm.get('peak_pss_mib'), 0)} | {fmt(mm.get('peak_above_idle_mib'), 0)} | "
                         f"{fmt(mm.get('ua_memory_mib'), 0)} | {fmt(mm.get('pyodide_heap_mib'), 0)} | "
                         f"{fmt(mm.get('page_memory_mib'), 0)} | – |")
    parts = ("run", "feeds", "kv", "logits", "topk", "python", "yield")
    lines += ["", "The page's decode step, ms per token:", "",
              "| configuration | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for k in sorted(cfg):
        if "per_token_ms" in cfg[k]:
            lines.append(f"| {k} | " + " | ".join(fmt(cfg[k]["per_token_ms"][p], 2) for p in parts) + " |")
    tg = s["targets"]
    lines += ["", "Targets:", "", "| target | configuration | ratio | met |", "|---|---|---|---|"]
    yes = lambda ok: "**yes**" if ok else "no"  # noqa: E731
    for r in tg["wasm_vs_ortcpu"]:
        lines.append(f"| page WASM ≥ {r['target']}× ORT CPU | {r['scheme']}, {r['threads']} thread(s), "
                     f"{r['metric'].removesuffix('_tok_s')} | {_r(r['ratio'])} | {yes(r['met'])} |")
    for r in tg["vs_wllama"]:
        tier = "same tier" if r["same_tier"] else "not the same tier"
        lines.append(f"| page ≥ {r['target']}× wllama | {r['scheme']} vs {r['wllama']} ({tier}), {r['threads']} "
                     f"thread(s), {r['metric'].removesuffix('_tok_s')} | {_r(r['ratio'])} | {yes(r['met'])} |")
    for r in tg["lzw_ttft"]:
        added = "–" if r["added"] is None else f"{100 * r['added']:+.0f}%"
        lines.append(f"| LZW adds ≤ {100 * r['target']:.0f}% to TTFT | {r['scheme']} {r['phase']} | {added} | "
                     f"{yes(r['met'])} |")
    for r in tg["memory"]:
        ratio = r.get("page_memory_ratio", r.get("peak_rss_ratio"))
        extra = (f" (Chromium PSS above idle: {_r(r['peak_above_idle_ratio'])}×)"
                 if "peak_above_idle_ratio" in r else " (peak RSS)")
        lines.append(f"| memory ≤ {r['target']}× weights | {r['config']}{extra} | {_r(ratio)} | {yes(r['met'])} |")
    for r in tg["fixes"]:
        lines.append(f"| fix: {r['fix']} | {r['scheme']} {r['metric']}: {r['before']:.2f} → {r['after']:.2f} | "
                     f"{_r(r['speedup'])}× | |")
    return "\n".join(lines) + "\n"
