"""The generation state machine with a fake session: greedy, seeded sampling, stops, cancellation."""
import numpy as np

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
