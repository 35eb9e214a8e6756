"""int8-eB (converter/quant/entropy.py): int8 codes whose per-row steps are chosen for a target order-0 entropy,
weighted by row importance on vocabulary tensors; laid out and run exactly as int8-g32."""
import json

import numpy as np
import pytest

import reference
from converter.bundle import BuildOptions, load, write_bundle
from converter.calibrate import CalibrationOptions, calibrate, output_error, quantize_with
from converter.errors import QuantError
from converter.layouts import family, linear_initializers
from converter.loaders import open_checkpoint
from converter.ort_session import OrtDecoder
from converter.quant import entropy, get_scheme

IDS = [5, 17, 42, 99, 3, 250, 7, 7, 300, 11]
SMALL = dict(sequences=4, seq_len=64, corpus_chars=20_000)


def _gauss(rows=256, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 0.5, (rows, 1)))           # rows of different magnitude, as in real weights
    return (rng.standard_normal((rows, cols)) * 0.02 * scale).astype(np.float32)


def test_names_parse_and_bad_targets_are_refused():
    s = get_scheme("int8-e4.25")
    assert s.target_bits == 4.25 and s.group == 32 and s.alphabet == 256 and not s.row_local
    assert family("int8-e3") == "nbits"
    for bad in ("int8-e0.5", "int8-e9", "int8-e4.125"):
        with pytest.raises(QuantError, match="int8-e|scheme"):
            get_scheme(bad)
    with pytest.raises(QuantError, match="multiple of|split into groups"):
        get_scheme("int8-e4").quantize(np.ones((4, 48), np.float32))


@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0, 5.5])
def test_codes_have_the_target_entropy(bits):
    w = _gauss()
    q = get_scheme(f"int8-e{bits:g}").quantize(w)
    got = entropy.entropy_bits(q.symbols.view(np.int8))
    assert abs(got - bits) < 0.05, (bits, got)
    assert q.extra["entropy_bits"] == pytest.approx(got, abs=1e-4)
    # without importance, one step for every row, except rows whose own int8 step max|w|/127 is coarser
    steps = q.scales[:, 0].astype(np.float32)
    floor = (np.abs(w).max(axis=1) / 127).astype(np.float16).astype(np.float32)
    assert len(np.unique(steps[steps > floor])) == 1
    assert np.allclose(steps[steps <= floor], floor[steps <= floor], rtol=2e-3)


def test_more_bits_less_error_and_codes_stay_int8():
    w = _gauss()
    errs = [get_scheme(f"int8-e{b}").quantize(w).rms_error for b in (2, 3, 4, 5, 6)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # error of a uniform quantizer: step^2 / 12 while the step is well above the floor
    q = get_scheme("int8-e3").quantize(w)
    step = float(q.scales[0, 0])
    assert q.rms_error == pytest.approx(step / np.sqrt(12), rel=0.05)
    np.testing.assert_array_equal(get_scheme("int8-e3").dequantize(q),
                                  q.symbols.view(np.int8).astype(np.float32) * step)


def test_importance_sets_finer_steps_and_the_int8_floor_holds():
    w = _gauss(rows=300)
    imp = np.ones(300)
    imp[:10] = 1e4                                          # ten rows matter enormously
    q = get_scheme("int8-e5.5").quantize(w, imp)          # at 5.5 bits the ten rows want more than int8 holds
    steps = q.scales[:, 0].astype(np.float32)
    assert steps[:10].max() < steps[10:].min()
    floor = np.abs(w).max(axis=1) / 127
    assert (steps >= floor.astype(np.float16).astype(np.float32) * 0.999).all()
    pinned = np.isclose(steps[:10], floor[:10], rtol=2e-3)           # at the row's own int8 step
    assert 0 < pinned.sum() < 10
    assert np.allclose(steps[:10][~pinned], steps[:10][~pinned].min(), rtol=1e-3)   # the others share one
    assert entropy.entropy_bits(q.symbols.view(np.int8)) == pytest.approx(5.5, abs=0.05)
    with pytest.raises(QuantError, match="importance"):
        get_scheme("int8-e3").quantize(w, np.ones(299))
    with pytest.raises(QuantError, match="importance"):
        get_scheme("int8-e3").quantize(w, -np.ones(300))


def test_token_importance_prior():
    imp = entropy.token_importance(1000, special_ids=[999, 5000])
    assert imp.sum() == pytest.approx(1.0)
    assert imp[0] > imp[10] > imp[500]                      # BPE ids: low = learned first = frequent
    assert imp[999] == imp.max()                            # special tokens at the top whatever their id
    probs = np.zeros(1000)
    probs[700] = 1.0
    mixed = entropy.token_importance(1000, [], probs)
    assert mixed.sum() == pytest.approx(1.0) and mixed.argmax() == 700


def test_layout_is_int8_g32():
    w = _gauss(rows=64, cols=128)
    q = get_scheme("int8-e4").quantize(w)
    a = {i.name: i for i in linear_initializers("x", q)}
    b = {i.name: i for i in linear_initializers("x", get_scheme("int8-g32").quantize(w))}
    assert set(a) == set(b) == {"x.q", "x.scales"}
    for k in a:
        assert (a[k].dtype, a[k].shape, a[k].alphabet, a[k].layout) == (b[k].dtype, b[k].shape, b[k].alphabet,
                                                                           b[k].layout)


def test_gptq_on_fixed_steps_keeps_the_rate_and_lowers_output_error():
    rng = np.random.default_rng(3)
    w = _gauss(rows=128, cols=256)
    mix = rng.standard_normal((256, 256)) * np.exp(-np.arange(256) / 40.0)[None, :]
    x = rng.standard_normal((2048, 256)) @ mix.T
    h = x.T @ x / len(x)
    s = get_scheme("int8-e3")
    rtn = quantize_with("rtn", s, w, h, CalibrationOptions(method="rtn"))
    gptq = quantize_with("gptq", s, w, h, CalibrationOptions(method="gptq"))
    np.testing.assert_array_equal(gptq.scales, rtn.scales)          # the rate target fixed the steps
    assert output_error(w, s.dequantize(gptq), h) < 0.8 * output_error(w, s.dequantize(rtn), h)
    assert abs(entropy.entropy_bits(gptq.symbols.view(np.int8)) - 3.0) < 0.25


@pytest.mark.parametrize("scheme,embed", [("int4-g32", "int8-e4"), ("int8-e3", "int8-e5")])
def test_bundle_matches_its_dequantized_reference(tiny_hf, tiny_bundles, scheme, embed):
    ck = open_checkpoint(tiny_hf[0])
    bundle = load(tiny_bundles(scheme, embed))
    assert bundle.manifest["embed_scheme"] == embed
    want = reference.forward(ck.config, reference.dequantized_weights(ck, scheme, embed), IDS)
    for variant in ("graph", "graph_wasm"):
        if variant == "graph_wasm" and "graph_wasm" not in bundle.manifest:
            continue
        got = OrtDecoder(bundle, variant=variant).forward_full(IDS)
        tol = 1e-3 if variant == "graph" else 3e-2          # the wasm graph quantizes activations per group
        assert float(np.abs(got - want).max() / np.abs(want).max()) < tol, variant


def test_calibrated_embedding_weighs_tokens_by_probability(tmp_path, tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    opts = CalibrationOptions(method="gptq", embedding="calibrated", **SMALL)
    write_bundle(ck, tmp_path / "b", BuildOptions(scheme="int4-g32", embed_scheme="int8-e4", chunk_symbols=4096,
                                                  smooth="off", calibration=opts))
    bundle = load(tmp_path / "b")
    assert "probability" in bundle.manifest["calibration"]["token_importance"]
    c = calibrate(ck, "int4-g32", "int8-e4", opts)
    try:
        q = c.get("model.embed_tokens.weight")
        weights = {n: (get_scheme(c.get(n).scheme).dequantize(c.get(n)) if n in c else ck.load(n)) for n in ck.tensors}
    finally:
        c.close()
    steps = q.scales[:, 0].astype(np.float32)
    tok = json.loads(ck.tokenizer_files()["tokenizer.json"])
    special = entropy.special_token_ids(tok)
    assert special and steps[special].max() <= np.median(steps)    # specials: the prior's top
    assert abs(q.extra.get("entropy_bits", entropy.entropy_bits(q.symbols.view(np.int8))) - 4.0) < 0.3
    got = OrtDecoder(bundle).forward_full(IDS)
    want = reference.forward(ck.config, weights, IDS)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-3


def test_mixed_precision_refuses_entropy_targets():
    for scheme, high in (("int8-e3", "int8-g32"), ("int4-g32", "int8-e5")):
        with pytest.raises(QuantError, match="entropy target"):
            CalibrationOptions(method="gptq", mixed=5.0, mixed_high=high).check(scheme)
