"""The generation state machine with a fake session: greedy, seeded sampling, stops, cancellation."""
import random

import numpy as np
import pytest

import tiny
from converter.ort_session import top_k_sorted
from converter.runtime.generate import SamplingConfig, generate, top_candidates
from converter.runtime.tokenizer import Tokenizer


class FakeSession:
    """Logits that favour token (last + 1) % V, so greedy output is predictable."""

    def __init__(self, vocab):
        self.vocab, self.last = vocab, None

    def reset(self):
        self.last = None

    def forward(self, ids):
        self.last = ids[-1]
        logits = [0.0] * self.vocab
        logits[(self.last + 1) % self.vocab] = 5.0
        logits[(self.last + 2) % self.vocab] = 4.0
        return top_candidates(logits)


def _tok():
    return Tokenizer.from_json_dict(tiny.tiny_tokenizer()[0])


def test_top_k_sorted_matches_pure_python_order_with_ties():
    rng = np.random.default_rng(0)
    logits = np.round(rng.standard_normal(1000), 1).astype(np.float32)   # many ties
    ids, vals = top_k_sorted(logits, 50)
    ref_ids, ref_vals = top_candidates(logits.tolist(), 50)
    assert ids == ref_ids and np.allclose(vals, ref_vals)


def test_greedy_max_tokens_and_eos():
    tok = _tok()
    res = generate(FakeSession(384), tok, [10], eos_ids=[15], cfg=SamplingConfig(max_new_tokens=100))
    assert res.token_ids == [11, 12, 13, 14] and res.stop_reason == "eos"
    res = generate(FakeSession(384), tok, [10], eos_ids=[], cfg=SamplingConfig(max_new_tokens=3))
    assert res.token_ids == [11, 12, 13] and res.stop_reason == "max_tokens"


def test_sampling_is_reproducible_from_seed():
    tok = _tok()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.5, top_k=2, seed=7)
    a = generate(FakeSession(384), tok, [10], [], cfg).token_ids
    b = generate(FakeSession(384), tok, [10], [], cfg).token_ids
    assert a == b and len(set(np.diff(a))) == 2              # both candidates were drawn


def test_stop_string_and_cancel():
    tok = _tok()
    pieces = []
    target = tok.decode([100])
    res = generate(FakeSession(384), tok, [97], [], SamplingConfig(max_new_tokens=50, stop_strings=(target,)),
                   on_text=pieces.append)
    assert res.stop_reason == "stop_string" and target not in res.text and "".join(pieces) == res.text
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3
    res = generate(FakeSession(384), tok, [10], [], SamplingConfig(max_new_tokens=50), should_stop=stop)
    assert res.stop_reason == "cancelled" and len(res.token_ids) == 3


# ---- the KV cache of earlier turns, and the context window

def test_reusable_prefix_never_covers_the_whole_prompt():
    from converter.runtime.generate import reusable_prefix
    assert reusable_prefix([], [1, 2, 3]) == 0
    assert reusable_prefix([1, 2, 9, 9], [1, 2, 3, 4]) == 2
    assert reusable_prefix([1, 2, 3, 4, 5], [1, 2, 3]) == 2          # the last prompt token must run
    assert reusable_prefix([1, 2, 3], [1, 2, 3]) == 2
    assert reusable_prefix([7], [1, 2]) == 0


def test_rewound_cache_gives_the_logits_of_a_fresh_prefill(tiny_bundles):
    from converter.bundle import load
    from converter.ort_session import OrtDecoder
    for scheme in ("f32", "int8", "int4-g32"):
        dec = OrtDecoder(load(tiny_bundles(scheme)))
        a, b, c = [5, 17, 42, 99], [3, 250, 7], [300, 11, 8, 1]
        dec.reset()
        dec.run(np.asarray([a + b]))
        assert dec.tokens == a + b
        dec.rewind(len(a))
        assert dec.tokens == a and dec.cached == len(a)
        got = dec.run(np.asarray([c]))[0]
        want = dec.forward_full(a + c)[len(a):]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        try:
            dec.rewind(dec.cached + 1)
        except ValueError as e:
            assert "cannot rewind" in str(e)
        else:
            raise AssertionError("rewind past the cache must be refused")


def test_second_turn_runs_only_its_new_tokens_and_says_the_same(tiny_bundles):
    """generate() keeps the cache of the prompt's common prefix with what the session ran: a chat's next turn
    prefills only the new message, and the reply is the one a fresh session gives."""
    from converter.cli import open_chat_model
    chat = open_chat_model(str(tiny_bundles("int8")))
    fresh = open_chat_model(str(tiny_bundles("int8")))
    cfg = SamplingConfig(max_new_tokens=6)
    history = [{"role": "user", "content": "hello there"}]
    first = chat.generate(chat.prompt_ids(history), cfg)
    assert first.cached_tokens == 0
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    ids = chat.prompt_ids(history)
    ran = []
    forward = chat.session.forward
    chat.session.forward = lambda x, *a: ran.append(list(x)) or forward(x, *a)
    second = chat.generate(ids, cfg)
    assert 0 < second.cached_tokens < len(ids) and ran[0] == ids[second.cached_tokens:]
    assert second.token_ids == fresh.generate(ids, cfg, reuse=False).token_ids
    assert second.token_ids == fresh.generate(ids, cfg).token_ids       # same prompt again: all but its last token


def test_context_bounds_the_prompt_and_the_reply():
    tok = _tok()
    try:
        generate(FakeSession(384), tok, list(range(10, 20)), [], SamplingConfig(max_new_tokens=50), context=10)
    except ValueError as e:
        assert "context holds 10" in str(e)
    else:
        raise AssertionError("a prompt as long as the context must be refused")
    res = generate(FakeSession(384), tok, list(range(10, 16)), [], SamplingConfig(max_new_tokens=50), context=10)
    assert res.stop_reason == "context" and len(res.token_ids) == 4


def test_fit_messages_leaves_out_the_oldest_turns(tiny_bundles):
    from converter.cli import open_chat_model
    chat = open_chat_model(str(tiny_bundles("int8")))
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(40):
        msgs += [{"role": "user", "content": f"question number {i} about foxes"},
                 {"role": "assistant", "content": f"answer number {i} about dogs"}]
    msgs.append({"role": "user", "content": "last"})
    assert len(chat.prompt_ids(msgs)) + 64 > chat.context
    kept, dropped = chat.fit_messages(msgs, reserve=64)
    assert len(chat.prompt_ids(kept)) + 64 <= chat.context and dropped == len(msgs) - len(kept) > 0
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1] and kept[1]["role"] == "user"
    assert chat.fit_messages(msgs[:3], reserve=64) == (msgs[:3], 0)


# ---- lookahead: draft tokens from the text so far, checked in the same run

class PrefixModel:
    """A session whose next token is a function of the whole prefix (as a model's is), with a KV cache of tokens:
    forward_positions answers for each of the last n positions from the prefix up to it, and it checks that the
    runtime rewinds the cache of unconfirmed drafts before running on."""

    def __init__(self, rule, context=0):
        self.rule, self.context, self.tokens, self.runs = rule, context, [], []

    def reset(self):
        self.tokens = []

    def rewind(self, n):
        assert 0 <= n <= len(self.tokens)
        del self.tokens[n:]

    def _cands(self, prefix):
        logits = [0.0] * 384
        logits[self.rule(prefix)] = 5.0
        return top_candidates(logits, 8)

    def forward_positions(self, ids, n):
        self.tokens += list(ids)
        self.runs.append(len(ids))
        assert not self.context or len(self.tokens) <= self.context
        return [self._cands(self.tokens[:len(self.tokens) - n + j + 1]) for j in range(n)]

    def forward(self, ids):
        return self.forward_positions(ids, 1)[0]


def _cycle_with_breaks(prefix):
    """10, 11, 12, 13, 10, 11, ... but every 9th position says 20: drafts are often right, sometimes wrong."""
    return 20 if len(prefix) % 9 == 0 else 10 + (prefix[-1] + 1 - 10) % 4 if 10 <= prefix[-1] <= 13 else 10


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    from converter.runtime.generate import NgramDrafter
    d = NgramDrafter([5, 6, 7, 8, 5, 6, 9, 1, 5, 6])
    assert d.draft(3) == [9, 1, 5]          # "5 6" last followed by 9 (the latest earlier match wins)
    d.extend([9])
    assert d.draft(2) == [1, 5]             # "5 6 9" seen once
    assert NgramDrafter([1, 2, 3]).draft(4) == [] and d.draft(0) == []
    assert NgramDrafter([4, 5, 4, 5]).draft(3) == [4, 5]     # what follows may run into the end of the text
    assert NgramDrafter([4, 4]).draft(3) == [] and NgramDrafter([4, 4], min_n=1).draft(3) == [4]


def test_lookahead_gives_the_greedy_tokens_in_fewer_runs():
    tok = _tok()
    prompt = [10, 11, 12, 13, 10, 11]
    plain = PrefixModel(_cycle_with_breaks)
    want = generate(plain, tok, prompt, [], SamplingConfig(max_new_tokens=60))
    for k in (1, 3, 6):
        model = PrefixModel(_cycle_with_breaks)
        got = generate(model, tok, prompt, [], SamplingConfig(max_new_tokens=60, lookahead=k))
        assert got.token_ids == want.token_ids and got.stop_reason == "max_tokens"
        assert got.sampled == want.sampled == 60
        assert max(model.runs[1:]) == k + 1 and got.decode_steps < want.decode_steps
        # the cache holds exactly the prompt and the confirmed tokens but the last (the rejected drafts are gone)
        assert model.tokens[:len(prompt) + 59] == prompt + got.token_ids[:59]
    assert want.decode_steps == 59 and max(plain.runs[1:]) == 1


def test_lookahead_respects_eos_max_tokens_context_and_sampling():
    tok = _tok()
    prompt = [10, 11, 12, 13, 10, 11]
    # an end-of-sequence token inside a confirmed run of drafts ends the reply there
    res = generate(PrefixModel(_cycle_with_breaks), tok, prompt, [20], SamplingConfig(max_new_tokens=60, lookahead=4))
    assert res.stop_reason == "eos" and res.token_ids == [12, 13, 10] and res.decode_steps == 1
    # never a draft past max_new_tokens, never a position past the context (PrefixModel asserts it)
    model = PrefixModel(lambda p: 10 + (p[-1] + 1 - 10) % 4 if 10 <= p[-1] <= 13 else 10, context=20)
    res = generate(model, tok, prompt, [], SamplingConfig(max_new_tokens=9, lookahead=8), context=20)
    assert len(res.token_ids) == 9 and res.stop_reason == "max_tokens" and max(model.runs[1:]) <= 8
    model = PrefixModel(model.rule, context=20)
    res = generate(model, tok, prompt, [], SamplingConfig(max_new_tokens=60, lookahead=8), context=20)
    assert res.stop_reason == "context" and len(prompt) + len(res.token_ids) == 20


def test_lookahead_when_sampling_keeps_every_token_probability():
    """Speculative sampling with certain drafts (check_draft): over many seeds, the pairs of tokens drawn after a
    prompt whose text suggests a draft have the model's probabilities, with and without lookahead."""
    from converter.runtime.generate import check_draft

    logits = {10: 2.0, 11: 1.0, 12: 0.0, 13: -1.0}
    z = sum(np.exp(list(logits.values())))
    p = {t: np.exp(v) / z for t, v in logits.items()}

    class Fixed(PrefixModel):        # the same distribution at every position
        def _cands(self, prefix):
            row = [-30.0] * 384
            for t, v in logits.items():
                row[t] = v
            return top_candidates(row, 8)

    tok = _tok()
    prompt = [12, 11, 12, 11, 12]         # "11 12" was followed by 11: the draft after the prompt's "11 12" is 11
    n = 4000
    for k in (0, 2):
        counts: dict = {}
        runs = 0
        for seed in range(n):
            model = Fixed(None)
            res = generate(model, tok, prompt, [], SamplingConfig(max_new_tokens=3, temperature=1.0, seed=seed,
                                                                  lookahead=k))
            counts[tuple(res.token_ids[:2])] = counts.get(tuple(res.token_ids[:2]), 0) + 1
            runs += len(model.runs)
        # chi-square over the 16 pairs against p(a) p(b): 15 degrees of freedom, 99.9 % quantile 37.7
        chi2 = sum((counts.get((a, b), 0) - n * p[a] * p[b]) ** 2 / (n * p[a] * p[b]) for a in p for b in p)
        assert chi2 < 37.7, (k, chi2, counts)
        if k:
            assert runs < 3 * n          # some drafts were kept: fewer runs than prefill + 2 decode steps each
    # a draft the sampling cuts off (top-k) is never kept; greedy keeps a draft exactly when it is the first choice
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    ids, vals = [10, 11, 12], [2.0, 1.0, 0.0]
    assert all(check_draft(ids, vals, cfg, random.Random(s), 12)[0] in (10, 11) for s in range(200))
    assert check_draft(ids, vals, SamplingConfig(), random.Random(0), 10) == (10, True)
    assert check_draft(ids, vals, SamplingConfig(), random.Random(0), 11) == (10, False)


def test_lookahead_on_a_real_graph_matches_greedy_and_the_page_glue(tiny_bundles):
    """OrtDecoder.forward_positions is the last n positions of one run; with lookahead the tokens are greedy's
    (a float32 graph: run shapes change the logits by rounding only)."""
    from converter.cli import open_chat_model
    chat = open_chat_model(str(tiny_bundles("f32")))
    ids = chat.tokenizer.encode("the quick brown fox jumps over the lazy dog and the quick brown fox")
    want = chat.generate(ids, SamplingConfig(max_new_tokens=40), reuse=False)
    got = chat.generate(ids, SamplingConfig(max_new_tokens=40, lookahead=3), reuse=False)
    assert got.token_ids == want.token_ids
    dec = chat.session
    dec.reset()
    full = dec.run(np.asarray([ids]))[0]
    dec.reset()
    dec.forward(ids[:-3])
    cands = dec.forward_positions(ids[-3:], 3)
    for j, (c_ids, c_vals) in enumerate(cands):
        row = full[len(ids) - 3 + j]
        assert c_ids[0] == int(np.argmax(row)) and abs(c_vals[0] - float(row.max())) < 1e-4


@pytest.mark.parametrize("mode", [dict(kv="inplace"), dict(low_memory=True), dict(low_memory=True, kv="inplace")])
def test_lookahead_on_the_cpu_session_modes(tiny_bundles, mode):
    """The in-place cache (GroupQueryAttention) and the staged sessions return the last n positions' candidates
    and rewind a lookahead step's unconfirmed drafts: the float graph's replies are greedy's."""
    from converter.bundle import load
    from converter.cli import open_chat_model
    from converter.ort_session import OrtDecoder
    chat = open_chat_model(str(tiny_bundles("f32")))
    chat.session = OrtDecoder(load(tiny_bundles("f32")), **mode)
    ids = chat.tokenizer.encode("the quick brown fox jumps over the lazy dog and the quick brown fox")
    runs = []
    f = chat.session.forward_positions
    chat.session.forward_positions = lambda x, n, *a: runs.append(n) or f(x, n, *a)
    want = chat.generate(ids, SamplingConfig(max_new_tokens=40), reuse=False)
    got = chat.generate(ids, SamplingConfig(max_new_tokens=40, lookahead=3), reuse=False)
    assert got.token_ids == want.token_ids and runs and got.decode_steps < want.decode_steps
