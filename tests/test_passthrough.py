"""GGUF passthrough: Q4_0 / Q4_1 / Q8_0 blocks of a GGUF source reach the bundle unchanged (issue 6, req. 3).

The proof is bit for bit: the bundle's decoded initializers are turned back into GGUF blocks and compared with the
bytes in the .gguf file; the graph's logits are compared with the numpy forward of the file's dequantized floats.
"""
import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import reference
import tiny
from converter.bundle import BuildOptions, load, write_bundle
from converter.errors import FormatError
from converter.loaders import open_checkpoint
from converter.ort_session import OrtDecoder
from converter.quant import Quantized, get_scheme
from converter.quant.ggml import SCHEME_OF_TYPE, from_blocks, to_blocks

IDS = [5, 17, 42, 99, 3, 250, 7, 7, 300, 11]
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _awkward_weights(shape, seed=0) -> np.ndarray:
    """Random weights plus the blocks quantizers get wrong: all zero, constant (Q4_1 d = 0 with m != 0), exact ties,
    one huge outlier, all negative."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[0, :32] = 0
    w[1, :32] = 0.0625
    w[2, :32] = np.float32(0.01) * (np.arange(32) - 16)
    w[3, 5] = 3.0
    w[4, :32] = -np.abs(w[4, :32])
    return w


# ---- the quantizers and the block codec against the gguf package ----------------------------------------------

@pytest.mark.parametrize("ggml_type", sorted(SCHEME_OF_TYPE))
def test_quantizer_matches_gguf_package_bit_for_bit(ggml_type):
    w = _awkward_weights((64, 256))
    qtype = getattr(gguf.GGMLQuantizationType, ggml_type)
    want = gguf_quantize(w, qtype)
    scheme = get_scheme(SCHEME_OF_TYPE[ggml_type])
    q = scheme.quantize(w)
    got = to_blocks(q)
    assert got.shape == want.shape
    diff_bits = int(np.unpackbits(got ^ want).sum())
    assert diff_bits == 0, f"{diff_bits} bits differ"
    np.testing.assert_array_equal(scheme.dequantize(q), gguf_dequantize(want, qtype))   # same float32 arithmetic
    assert q.max_error == pytest.approx(float(np.abs(w - scheme.dequantize(q)).max()))


@pytest.mark.parametrize("ggml_type", sorted(SCHEME_OF_TYPE))
def test_blocks_round_trip_exactly(ggml_type):
    w = _awkward_weights((32, 128), seed=1)
    raw = gguf_quantize(w, getattr(gguf.GGMLQuantizationType, ggml_type))
    q = from_blocks(raw, ggml_type, w.shape)
    assert q.scheme == SCHEME_OF_TYPE[ggml_type] and q.symbols.shape == w.shape
    np.testing.assert_array_equal(to_blocks(q), raw)
    np.testing.assert_array_equal(get_scheme(q.scheme).dequantize(q),
                                  gguf_dequantize(raw, getattr(gguf.GGMLQuantizationType, ggml_type)))


def test_bad_blocks_are_refused_by_name():
    raw = gguf_quantize(_awkward_weights((8, 64)), gguf.GGMLQuantizationType.Q4_1)
    with pytest.raises(Exception, match="blk.0.attn_q.weight.*do not hold a 8 × 96"):
        from_blocks(raw, "Q4_1", (8, 96), "blk.0.attn_q.weight")
    bad = raw.copy()
    bad[0, 0:2] = np.array([0x7C00], np.uint16).view(np.uint8)            # d = +Inf
    with pytest.raises(Exception, match="x.gguf: tensor t.*NaN or Inf"):
        from_blocks(bad, "Q4_1", (8, 64), "x.gguf: tensor t")
    with pytest.raises(Exception, match="Q5_0 has no passthrough"):
        from_blocks(raw, "Q5_0", (8, 64))


# ---- bundles of GGUF sources ----------------------------------------------------------------------------------

def _write_quantized_gguf(path, linear_type: str, embed_type: str):
    weights = tiny.tiny_weights(tiny.TINY, tied=True)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        weights[name] = _awkward_weights(weights[name].shape, seed=2)
    quant = {f"blk.{i}.{n}.weight": linear_type for i in range(tiny.TINY["num_hidden_layers"]) for n in LINEAR}
    quant["token_embd.weight"] = embed_type
    tiny.write_gguf(path, weights, quant=quant)
    return path


def _decoded(bundle) -> dict[str, np.ndarray]:
    return {e["name"]: a for e, a in bundle.decode_initializers()}


def _bundle_blocks(arrays: dict, name: str, scheme: str, shape) -> np.ndarray:
    """A bundle's initializers of one tensor -> GGUF block bytes, in the GGUF's row order (q/k re-permuted)."""
    rows, cols = shape
    packed = arrays[name + ".q"].reshape(rows, -1)
    if scheme == "q8_0":
        codes = (packed.astype(np.int16) - 128).astype(np.int8).view(np.uint8)        # MatMulNBits 8-bit: zp 128
    else:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, cols)   # nibbles, low first
    q = Quantized(scheme, (rows, cols), codes, arrays[name + ".scales"].reshape(rows, -1), group=32,
                  mins=arrays[name + ".mins"].reshape(rows, -1) if name + ".mins" in arrays else None)
    heads = {"q_proj": tiny.TINY["num_attention_heads"], "k_proj": tiny.TINY["num_key_value_heads"]}
    for key, n_head in heads.items():
        if f"self_attn.{key}." in name:
            q = Quantized(scheme, q.shape, tiny.permute_for_gguf(q.symbols, n_head),
                          tiny.permute_for_gguf(q.scales, n_head), group=32,
                          mins=None if q.mins is None else tiny.permute_for_gguf(q.mins, n_head))
    return to_blocks(q)


@pytest.mark.parametrize("linear_type,embed_type", [("Q4_1", "Q8_0"), ("Q4_0", "Q4_0"), ("Q8_0", "Q4_1")])
def test_source_bundle_keeps_every_block_bit_for_bit(tmp_path, linear_type, embed_type):
    path = _write_quantized_gguf(tmp_path / "m.gguf", linear_type, embed_type)
    ck = open_checkpoint(path)
    m = write_bundle(ck, tmp_path / "b", BuildOptions(scheme="source", chunk_symbols=4096))
    assert (m["scheme"], m["embed_scheme"]) == (SCHEME_OF_TYPE[linear_type], SCHEME_OF_TYPE[embed_type])
    bundle = load(tmp_path / "b")
    arrays = _decoded(bundle)
    reader = gguf.GGUFReader(str(path))
    source = {t.name: np.asarray(t.data) for t in reader.tensors}
    checked = 0
    for t in m["tensors"]:
        st = ck.tensors[t["name"]]
        if len(st.shape) == 1:
            continue
        assert t["scheme"] == SCHEME_OF_TYPE[st.dtype] and t["max_error"] == 0 and t["rms_error"] == 0, t["name"]
        got = _bundle_blocks(arrays, t["name"], t["scheme"], st.shape)
        want = source[st.source_name]
        assert got.shape == want.shape, t["name"]
        diff_bits = int(np.unpackbits(got ^ want).sum())
        assert diff_bits == 0, f"{t['name']}: {diff_bits} bits differ from {st.source_name}"
        checked += 1
    assert checked == 1 + 7 * tiny.TINY["num_hidden_layers"]


@pytest.mark.parametrize("linear_type,embed_type", [("Q4_1", "Q8_0"), ("Q4_0", "Q4_0"), ("Q8_0", "Q4_1")])
def test_source_bundle_logits_match_dequantized_gguf(tmp_path, linear_type, embed_type):
    """onnxruntime on the passthrough bundle vs the numpy forward (float64) of the GGUF's dequantized floats: only
    float rounding apart (Q4_1 runs as float zero points -m/d, which rounds once more than d*q + m; the fused
    RMSNorm and RoPE kernels sum in their own order). 1e-5 of the largest logit is float32 rounding; a wrong scale,
    minimum or block order is off by percents."""
    ck = open_checkpoint(_write_quantized_gguf(tmp_path / "m.gguf", linear_type, embed_type))
    write_bundle(ck, tmp_path / "b", BuildOptions(scheme="source", chunk_symbols=4096))
    want = reference.forward(ck.config, {n: ck.load(n) for n in ck.tensors}, IDS)
    dec = OrtDecoder(load(tmp_path / "b"))
    got = dec.forward_full(IDS)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-5
    dec.reset()                                                   # the cached path agrees too
    steps = [dec.run(np.asarray([IDS[:5]]))[0, -1]] + [dec.run(np.asarray([[t]]))[0, -1] for t in IDS[5:]]
    assert float(np.abs(np.stack(steps) - want[4:]).max() / np.abs(want).max()) < 1e-5
    half = OrtDecoder(load(tmp_path / "b"), float16=True).forward_full(IDS)   # the float16 graph of the same blocks
    assert float(np.abs(half - want).max() / np.abs(want).max()) < 1e-2


def test_matching_scheme_passes_through_and_others_requantize(tmp_path):
    ck = open_checkpoint(_write_quantized_gguf(tmp_path / "m.gguf", "Q4_1", "Q8_0"))
    m = write_bundle(ck, tmp_path / "q41", BuildOptions(scheme="q4_1", embed_scheme="q8_0", chunk_symbols=4096))
    assert all(t["max_error"] == 0 for t in m["tensors"])
    m = write_bundle(ck, tmp_path / "i4", BuildOptions(scheme="int4-g32", embed_scheme="source", chunk_symbols=4096))
    errs = {t["name"]: t["max_error"] for t in m["tensors"]}
    assert m["embed_scheme"] == "q8_0" and errs["model.embed_tokens.weight"] == 0
    assert errs["model.layers.0.mlp.up_proj.weight"] > 0         # integer zero points cannot hold Q4_1's minimum


def test_q4_1_from_floats_matches_llama_cpp_quantizer(tiny_hf, tmp_path):
    """On a float source, q4_1 quantizes like llama.cpp: the bundle's blocks equal gguf.quants' blocks."""
    folder, weights = tiny_hf
    write_bundle(open_checkpoint(folder), tmp_path / "b", BuildOptions(scheme="q4_1", chunk_symbols=4096))
    arrays = _decoded(load(tmp_path / "b"))
    name = "model.layers.1.mlp.down_proj.weight"
    rows, cols = weights[name].shape
    packed = arrays[name + ".q"].reshape(rows, -1)
    q = Quantized("q4_1", (rows, cols), np.stack([packed & 15, packed >> 4], -1).reshape(rows, cols),
                  arrays[name + ".scales"].reshape(rows, -1), group=32, mins=arrays[name + ".mins"].reshape(rows, -1))
    np.testing.assert_array_equal(to_blocks(q), gguf_quantize(weights[name], gguf.GGMLQuantizationType.Q4_1))


def test_source_refuses_unsupported_and_mixed_types_by_name(tmp_path):
    weights = tiny.tiny_weights(tiny.TINY, tied=True)
    tiny.write_gguf(tmp_path / "q5.gguf", weights, quant={"blk.1.ffn_down.weight": "Q5_0"})
    with pytest.raises(FormatError, match=r"q5.gguf: tensor blk.1.ffn_down.weight is Q5_0"):
        write_bundle(open_checkpoint(tmp_path / "q5.gguf"), tmp_path / "b", BuildOptions(scheme="source"))
    tiny.write_gguf(tmp_path / "mix.gguf", weights, quant={"blk.1.ffn_down.weight": "Q4_1"})
    with pytest.raises(FormatError, match=r"mix.gguf: tensor blk.1.ffn_down.weight is Q4_1 but .* is F32"):
        write_bundle(open_checkpoint(tmp_path / "mix.gguf"), tmp_path / "b", BuildOptions(scheme="source"))
    assert not (tmp_path / "b").exists()


def test_cli_builds_a_source_bundle(tmp_path, capsys):
    from converter.cli import main

    path = _write_quantized_gguf(tmp_path / "m.gguf", "Q4_1", "Q8_0")
    assert main(["build", str(path), "--scheme", "source", "--out", str(tmp_path / "b")]) == 0
    assert load(tmp_path / "b").manifest["scheme"] == "q4_1"
    assert main(["build", str(path), "--scheme", "int3", "--out", str(tmp_path / "c")]) == 2
    assert "unknown scheme 'int3'" in capsys.readouterr().err


def test_source_linears_with_a_calibrated_embedding(tmp_path, capsys):
    """--scheme source --embed-scheme int4-g32 --calibrate --calib-embedding: the linear layers keep the GGUF's
    blocks (identical to the plain source bundle's), only the embedding / tied lm_head is calibrated (GPTQ with the
    Hessian of the final hidden states), and that beats round to nearest on the same objective."""
    from converter.calibrate import CalibrationOptions, calibrate
    from converter.cli import main

    path = _write_quantized_gguf(tmp_path / "m.gguf", "Q4_1", "Q8_0")
    ck = open_checkpoint(path)
    small = dict(embedding="calibrated", sequences=4, seq_len=64, corpus_chars=20_000)
    errs = {}
    for method in ("rtn", "gptq"):
        c = calibrate(ck, "q4_1", "int4-g32", CalibrationOptions(method=method, **small))
        try:
            assert list(c.spill.names) == ["model.embed_tokens.weight"]        # nothing else is calibrated
            assert "mean_output_error" not in c.record
            errs[method] = c.record["embedding_output_error"]
        finally:
            c.close()
    assert 0 < errs["gptq"] < 0.9 * errs["rtn"], errs

    cal = write_bundle(ck, tmp_path / "cal", BuildOptions(scheme="source", embed_scheme="int4-g32", chunk_symbols=4096,
                                                         calibration=CalibrationOptions(method="gptq", **small)))
    write_bundle(ck, tmp_path / "rtn", BuildOptions(scheme="source", embed_scheme="int4-g32", chunk_symbols=4096))
    a, b = _decoded(load(tmp_path / "cal")), _decoded(load(tmp_path / "rtn"))
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith("model.embed_tokens."):
            continue
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not np.array_equal(a["model.embed_tokens.weight.q"], b["model.embed_tokens.weight.q"])
    assert cal["scheme"] == "q4_1" and cal["calibration"]["embedding_output_error"] == errs["gptq"]
    assert all(t["max_error"] == 0 for t in cal["tensors"] if t["scheme"] == "q4_1")
    logits = OrtDecoder(load(tmp_path / "cal")).forward_full(IDS)
    assert np.isfinite(logits).all()

    # the CLI: without --calib-embedding there is nothing to calibrate, and it says so
    assert main(["build", str(path), "--scheme", "source", "--calibrate", "--out", str(tmp_path / "c")]) == 2
    assert "only the embedding can be calibrated" in capsys.readouterr().err
    assert main(["build", str(path), "--scheme", "source", "--embed-scheme", "int4-g32", "--calibrate", "gptq",
                 "--calib-embedding", "--calib-tokens", "256", "--out", str(tmp_path / "d")]) == 0
    assert "lm_head's" in capsys.readouterr().out
