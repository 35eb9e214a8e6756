"""8-bit group codes split by the loader (ort_session.split_8bit_codes): the session reads NAME.q.hi4 / NAME.q.lo4
made in numpy instead of folding the graph's nibble subgraph, bit for bit the same model, whole or in stages."""
import numpy as np
import onnx
import pytest

from converter.bundle import load
from converter.onnx_export import LOGITS_TO_KEEP
from converter.ort_session import (HALVES, OrtDecoder, create_session, eight_bit_half, graph_model,
                                   split_8bit_codes)

IDS = [1, 5, 9, 2, 7, 3, 8, 4, 6, 10, 11, 12]


def _logits(sess, n):
    feeds = {"input_ids": np.array([IDS], np.int64), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None], LOGITS_TO_KEEP: np.array(0, np.int64)}
    inputs = {i.name for i in sess.get_inputs()}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
    return sess.run(["logits"], {k: v for k, v in feeds.items() if k in inputs})[0]


@pytest.mark.parametrize("scheme,embed", [("int8-g32", "int8-g32"), ("int8-e3", "int8-e4"), ("int4-g32", "int8-g32")])
def test_split_codes_give_the_same_logits(tiny_bundles, scheme, embed):
    bundle = load(tiny_bundles(scheme, embed))
    model = graph_model(bundle, False, "graph", False)
    ops = {n.op_type for n in model.graph.node}
    halves = [t.name for t in model.graph.initializer if t.name[-4:] in HALVES]
    n_linear = 7 * bundle.config.num_hidden_layers if scheme != "int4-g32" else 0
    assert len(halves) == 2 * (n_linear + 1)                       # + the tied lm_head
    assert "BitShift" not in ops and "BitwiseAnd" not in ops and "Split" not in ops
    # the tied embedding's Gather still reads the 8-bit codes; the linear layers' codes are no longer initializers
    names = {t.name for t in model.graph.initializer}
    assert "model.embed_tokens.weight.q" in names
    assert n_linear == 0 or not any(n.startswith("model.layers.") and n.endswith(".q") for n in names)
    want = _logits(create_session(bundle, split8=False), len(IDS))
    got = _logits(create_session(bundle), len(IDS))
    assert np.array_equal(got, want)
    staged = OrtDecoder(bundle, low_memory=True).forward_full(IDS)
    assert np.abs(staged - want[0]).max() <= 1e-4 * np.abs(want).max()


def test_half_packing_matches_the_graphs_nibbles():
    codes = np.arange(2 * 3 * 32, dtype=np.uint8).reshape(2, 3, 32) * 7
    hi, lo = eight_bit_half(codes, "x.q.hi4", [2, 3, 16]), eight_bit_half(codes, "x.q.lo4", [2, 3, 16])
    assert hi.shape == lo.shape == (2, 3, 16)
    assert np.array_equal(hi & 15, codes[..., 0::2] >> 4) and np.array_equal(hi >> 4, codes[..., 1::2] >> 4)
    assert np.array_equal(lo & 15, codes[..., 0::2] & 15) and np.array_equal(lo >> 4, codes[..., 1::2] & 15)


def test_a_graph_without_8bit_groups_is_left_alone(tiny_bundles):
    bundle = load(tiny_bundles("int4-g32", "int4-g32"))
    model = onnx.load_from_string(bundle.graph_bytes(False, "graph"))
    before = model.SerializeToString()
    assert split_8bit_codes(model) == 0 and model.SerializeToString() == before
