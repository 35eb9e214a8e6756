"""bench/frontier.py's pieces on the tiny model: the in-memory float graph and the gguf round trip it relies on."""
import sys

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

import reference
from converter.loaders import open_checkpoint
from converter.ort_session import OrtDecoder
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import frontier  # noqa: E402

IDS = [5, 17, 42, 99, 3, 250, 7, 7, 300, 11]


def test_float_model_runs_our_f32_graph(tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    weights = {n: ck.load(n) for n in ck.tensors}
    got = OrtDecoder(frontier.FloatModel(ck.config, weights)).forward_full(IDS)
    want = reference.forward(ck.config, weights, IDS)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4


def test_gguf_roundtrip_pads_rows_to_whole_blocks():
    w = (np.random.default_rng(0).standard_normal((8, 576)) * 0.05).astype(np.float32)
    deq, nbytes = frontier.gguf_roundtrip(w, "TQ2_0")                 # blocks of 256: 576 -> 768 columns
    padded = np.pad(w, ((0, 0), (0, 192)))
    q = quantize(padded, gguf.GGMLQuantizationType.TQ2_0)
    assert nbytes == q.nbytes and deq.shape == w.shape
    np.testing.assert_array_equal(deq, dequantize(q, gguf.GGMLQuantizationType.TQ2_0)[:, :576])
    deq, nbytes = frontier.gguf_roundtrip(w, "Q4_1")
    assert nbytes == 8 * 576 // 32 * 20


def test_float_gguf_for_llama_cpp_keeps_every_weight_and_the_metadata(tmp_path):
    """bench/llamacpp_quants.py's F32 GGUF (what llama.cpp's quantizer reads) holds the source's weights exactly, in
    llama.cpp's layout, with its metadata; frontier's --gguf label names the file's mix and counts its types."""
    import tiny
    import llamacpp_quants

    weights = tiny.tiny_weights(tiny.TINY, tied=True)
    src = tmp_path / "q.gguf"
    tiny.write_gguf(src, weights, quant={"blk.0.ffn_down.weight": "Q4_1", "token_embd.weight": "Q8_0"})
    out = llamacpp_quants.float_gguf(src, tmp_path / "f32.gguf")
    a, b = open_checkpoint(src), open_checkpoint(out)
    assert a.config == b.config and a.tokenizer_files() == b.tokenizer_files()
    assert a.tensors.keys() == b.tensors.keys()
    for n in a.tensors:
        np.testing.assert_array_equal(a.load(n), b.load(n))
    label, types = frontier.gguf_file_label(out)
    assert label == "ALL_F32 (llama.cpp quantize)" and set(types) == {"F32"}
    _, types = frontier.gguf_file_label(src)
    assert types["Q4_1"] == 1 and types["Q8_0"] == 1 and types["F32"] == len(a.tensors) - 2
