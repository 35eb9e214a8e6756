"""Calibrated quantization (converter/calibrate.py): GPTQ on the schemes' own grids, clip search, mixed precision,
the layer-by-layer forward's memory bound, and calibrated bundles against their own dequantized numpy forward."""
import json
import weakref

import numpy as np
import pytest

import reference
from converter.bundle import BuildOptions, load, manifest_digest, write_bundle
from converter.calibrate import (CalibrationOptions, calibrate, output_error, quantize_gptq, quantize_rtn,
                                 values_on_grid)
from converter.errors import BundleError
from converter.loaders import open_checkpoint
from converter.ort_session import OrtDecoder
from converter.quant import get_scheme

SCHEMES = ["int4-g32", "int4-g128", "int4-m32", "int4-m64", "int2-g64", "int8-g32", "int8", "ternary", "ternary-g64"]
IDS = [5, 17, 42, 99, 3, 250, 7, 7, 300, 11]
SMALL = dict(sequences=4, seq_len=64, corpus_chars=20_000)       # 256 calibration tokens: fast on the tiny model


def _layer(seed=0, rows=64, cols=256, n=1024):
    """A weight and inputs with correlated, unevenly scaled features (what makes GPTQ worth doing)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    mix = rng.standard_normal((cols, cols)) * np.exp(-np.arange(cols) / 40.0)[None, :]
    x = (rng.standard_normal((n, cols)) @ mix.T).astype(np.float32)
    return w, x.astype(np.float64).T @ x.astype(np.float64) / n


# ---- the grid is the scheme's own -------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
def test_rtn_reproduces_the_scheme_quantizer_exactly(scheme):
    s = get_scheme(scheme)
    w, _ = _layer(1)
    want, got = s.quantize(w), quantize_rtn(s, w)
    np.testing.assert_array_equal(got.symbols, want.symbols)
    np.testing.assert_array_equal(got.scales, want.scales)
    if want.zeros is not None:
        np.testing.assert_array_equal(got.zeros, want.zeros)
    if want.mults is not None:                              # int4-mG's multipliers
        np.testing.assert_array_equal(got.mults, want.mults)
    assert got.rms_error == pytest.approx(want.rms_error)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gptq_reduces_layer_output_error_vs_rtn_on_the_same_grid(scheme):
    s = get_scheme(scheme)
    w, h = _layer(2)
    rtn, gptq = quantize_rtn(s, w), quantize_gptq(s, w, h)
    assert gptq.symbols.dtype == np.uint8 and int(gptq.symbols.max()) < s.alphabet
    assert gptq.scales.dtype == np.float16 and gptq.scales.shape == rtn.scales.shape
    e_rtn = output_error(w, s.dequantize(rtn), h)
    e_gptq = output_error(w, s.dequantize(gptq), h)
    assert e_gptq < 0.8 * e_rtn, (scheme, e_rtn, e_gptq)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-m32"])
def test_gptq_with_identity_hessian_is_round_to_nearest(scheme):
    """With uncorrelated inputs there is nothing to compensate: GPTQ must give RTN's codes (and int4-mG's
    multipliers)."""
    s = get_scheme(scheme)
    w, _ = _layer(3)
    got, want = quantize_gptq(s, w, np.eye(w.shape[1])), s.quantize(w)
    np.testing.assert_array_equal(got.symbols, want.symbols)
    if want.mults is not None:
        np.testing.assert_array_equal(got.mults, want.mults)


def _outlier_layer(seed=7, rows=64, cols=256, n=2048):
    """Inputs with a few massive columns placed late in the order (as SmolLM2's massive activations are somewhere
    in the middle of the residual stream), mixed a little into the others."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x = rng.standard_normal((n, cols))
    x[:, [150, 201, 240]] *= 40.0
    x = x @ (np.eye(cols) + 0.05 * rng.standard_normal((cols, cols)))
    return w, x.T @ x / n


@pytest.mark.parametrize("scheme", ["int8-e3.15", "int8"])
def test_act_order_is_gptq_on_the_columns_sorted_by_activation(scheme):
    """--act-order: the same GPTQ run on the columns ordered by decreasing diag(H), its codes put back in the
    weight's own order; on inputs with a few massive columns it lowers the output error."""
    from converter.quant import entropy
    s = get_scheme(scheme)
    w, h = _outlier_layer()
    steps = entropy.row_steps(w, s.target_bits, None, None) if s.target_bits else None
    plain = quantize_gptq(s, w, h, steps=steps)
    ao = quantize_gptq(s, w, h, steps=steps, act_order=True)
    perm = np.argsort(-np.diag(h), kind="stable")
    by_hand = quantize_gptq(s, w[:, perm], h[np.ix_(perm, perm)], steps=steps)
    np.testing.assert_array_equal(ao.symbols[:, perm], by_hand.symbols)
    np.testing.assert_array_equal(ao.scales, by_hand.scales)
    assert not np.array_equal(ao.symbols, plain.symbols)
    e_plain, e_ao = (output_error(w, s.dequantize(q), h) for q in (plain, ao))
    assert e_ao < 0.9 * e_plain, (e_plain, e_ao)


def test_act_order_leaves_group_schemes_alone():
    """A group's grid is chosen when the group starts, so reordering columns would mix groups: group schemes run
    in order whatever act_order says."""
    s = get_scheme("int4-g32")
    w, h = _outlier_layer()
    a, b = quantize_gptq(s, w, h), quantize_gptq(s, w, h, act_order=True)
    np.testing.assert_array_equal(a.symbols, b.symbols)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-m32", "int2-g64", "int8"])
def test_clip_search_never_loses_to_rtn_on_its_objective(scheme):
    s = get_scheme(scheme)
    w, h = _layer(4)
    d = np.diag(h)
    rtn, clip = quantize_rtn(s, w), quantize_rtn(s, w, d, (1.0, 0.9, 0.8, 0.7))
    err = lambda q: float((((w - s.dequantize(q)) ** 2) * d[None, :]).sum())  # noqa: E731
    assert err(clip) <= err(rtn)          # α = 1 is a candidate: never worse
    if scheme != "int8":                  # 255 levels per channel: clipping Gaussian weights buys nothing
        assert err(clip) < err(rtn)


def test_values_on_grid_is_the_scheme_dequantizer():
    s = get_scheme("int4-g32")
    w, _ = _layer(5, cols=32)
    q = s.quantize(w)
    np.testing.assert_array_equal(values_on_grid(s, q.symbols, q.scales[:, 0], q.zeros[:, 0]), s.dequantize(q))


# ---- the layer-by-layer pass on a tiny model --------------------------------------------------------------------

def test_calibration_lowers_output_error_and_is_deterministic(tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    runs = {}
    for method in ("rtn", "gptq", "gptq"):
        c = calibrate(ck, "int4-g32", "int8", CalibrationOptions(method=method, **SMALL))
        try:
            runs.setdefault(method, []).append((c.record["mean_output_error"],
                                                {n: c.get(n).symbols for n in c.spill.names}))
        finally:
            c.close()
    assert runs["gptq"][0][0] < 0.5 * runs["rtn"][0][0]
    (e1, a), (e2, b) = runs["gptq"]
    assert e1 == e2 and a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])


class _Tracking:
    """A checkpoint whose loaded arrays are tracked while alive (weakref), to prove the pass never holds more
    than one decoder layer's weights (plus the embedding while it is read)."""

    def __init__(self, ck):
        self.ck, self.alive, self.peak_layers, self.peak_bytes = ck, {}, 0, 0
        self.config, self.tensors = ck.config, ck.tensors

    def tokenizer_files(self):
        return self.ck.tokenizer_files()

    def load(self, name):
        a = self.ck.load(name)
        key = (name, id(a))
        self.alive[key] = a.nbytes
        weakref.finalize(a, self.alive.pop, key, None)
        layers = {n.split(".")[2] for n, _ in self.alive if n.startswith("model.layers.")}
        self.peak_layers = max(self.peak_layers, len(layers))
        self.peak_bytes = max(self.peak_bytes, sum(self.alive.values()))
        return a


def test_memory_is_bounded_by_one_layer(tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    tr = _Tracking(ck)
    c = calibrate(tr, "int4-g32", "int8", CalibrationOptions(method="gptq", embedding="calibrated", **SMALL))
    c.close()
    sizes = {n: 4 * int(np.prod(t.shape)) for n, t in ck.tensors.items()}
    layer0 = sum(v for n, v in sizes.items() if n.startswith("model.layers.0."))
    assert tr.peak_layers == 1
    assert tr.peak_bytes <= max(layer0, sizes["model.embed_tokens.weight"]) + 4 * ck.config.hidden_size
    assert tr.peak_bytes < sum(sizes.values()) / 2


# ---- bundles ----------------------------------------------------------------------------------------------------

def _calibrated_weights(ck, scheme, embed_scheme, opts):
    """What a calibrated bundle holds, as float32: calibrate() again (it is deterministic) and dequantize."""
    c = calibrate(ck, scheme, embed_scheme, opts)
    try:
        out = {}
        for name in ck.tensors:
            a = ck.load(name)
            if name in c:
                q = c.get(name)
                a = get_scheme(q.scheme).dequantize(q)
            elif a.ndim == 2:
                s = get_scheme(embed_scheme)
                a = s.dequantize(s.quantize(a))
            out[name] = a
        return out, c.schemes
    finally:
        c.close()


@pytest.mark.parametrize("scheme,opts", [
    ("int4-g32", CalibrationOptions(method="gptq+clip", embedding="calibrated", **SMALL)),
    ("int4-g32", CalibrationOptions(method="gptq", mixed=5.0, mixed_high="int8-g32", **SMALL)),
    ("int4-m32", CalibrationOptions(method="gptq+clip", **SMALL))], ids=["gptq+clip", "mixed", "int4-m32"])
def test_calibrated_bundle_matches_its_dequantized_reference(tmp_path, tiny_hf, scheme, opts):
    ck = open_checkpoint(tiny_hf[0])
    write_bundle(ck, tmp_path / "b", BuildOptions(scheme=scheme, embed_scheme="int8-g32", chunk_symbols=4096,
                                                  smooth="off",
                                                  calibration=opts))
    bundle = load(tmp_path / "b")
    m = bundle.manifest
    assert m["calibration"]["method"] == opts.method and m["calibration"]["text"]["tokens"] == 256
    weights, schemes = _calibrated_weights(ck, scheme, "int8-g32", opts)
    for t in m["tensors"]:
        if t["name"] in schemes:
            assert t["scheme"] == schemes[t["name"]]
    if opts.mixed is not None:
        promoted = m["calibration"]["mixed"]["promoted"]
        assert promoted and all(schemes[n] == "int8-g32" for n in promoted)
        assert m["calibration"]["mixed"]["nominal_bits"] <= 5.0
    want = reference.forward(ck.config, weights, IDS)
    got = OrtDecoder(bundle).forward_full(IDS)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-3


def test_rtn_calibration_writes_the_plain_bundle_blobs(tmp_path, tiny_hf, tiny_bundles):
    ck = open_checkpoint(tiny_hf[0])
    write_bundle(ck, tmp_path / "b", BuildOptions(scheme="int4-g32", chunk_symbols=4096, smooth="off",
                                                  calibration=CalibrationOptions(method="rtn", **SMALL)))
    plain = load(tiny_bundles("int4-g32")).manifest
    got = load(tmp_path / "b").manifest
    assert [b["sha256"] for b in got["blobs"]] == [b["sha256"] for b in plain["blobs"]]


@pytest.mark.parametrize("key, value", [("method", "magic"), ("act_order", "yes")])
def test_manifest_calibration_record_is_validated(tmp_path, tiny_hf, key, value):
    ck = open_checkpoint(tiny_hf[0])
    write_bundle(ck, tmp_path / "b", BuildOptions(scheme="int4-g32", chunk_symbols=4096,
                                                  calibration=CalibrationOptions(method="gptq", **SMALL)))
    path = tmp_path / "b" / "manifest.json"
    m = json.loads(path.read_text())
    m["calibration"][key] = value
    m["integrity"]["sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match=f"calibration.{key}"):
        load(tmp_path / "b")


def test_cli_calibrate_flag(tmp_path, tiny_hf):
    from converter.cli import main
    assert main(["build", str(tiny_hf[0]), "--scheme", "int4", "--calibrate", "--calib-tokens", "256",
                 "--out", str(tmp_path / "c")]) == 0
    c = load(tmp_path / "c").manifest["calibration"]
    assert c["method"] == "gptq+clip" and c["text"]["tokens"] == 256 and c["text"]["corpus"] == "pydoc_data.topics"
    assert c["act_order"] is False


def test_cli_act_order_changes_the_codes_and_is_recorded(tmp_path, tiny_hf):
    """--act-order reaches GPTQ (other codes than the plain run's) and the manifest; without --calibrate, or with a
    group scheme (where it would be ignored), the build is refused."""
    from converter.cli import main
    args = ["build", str(tiny_hf[0]), "--scheme", "int8", "--calibrate", "gptq", "--calib-tokens", "256"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--act-order", "--out", str(tmp_path / "ao")]) == 0
    plain, ao = load(tmp_path / "plain"), load(tmp_path / "ao")
    assert ao.manifest["calibration"]["act_order"] is True
    assert plain.manifest["calibration"]["act_order"] is False
    a = {e["name"]: x for e, x in plain.decode_initializers()}
    b = {e["name"]: x for e, x in ao.decode_initializers()}
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[n], b[n]) for n in a if "layers" in n), "act-order changed no layer's codes"
    assert main(["build", str(tiny_hf[0]), "--scheme", "int8", "--act-order", "--out", str(tmp_path / "x")]) == 2
    assert main(["build", str(tiny_hf[0]), "--scheme", "int4-g32", "--calibrate", "gptq", "--act-order",
                 "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
