"""Activation smoothing (converter/smooth.py): exact in float, recorded in the manifest, refused where it was not
measured, its per-layer search never worse than no smoothing on what it measures, on by default for int4 only,
and its record checked like every other manifest field."""
import numpy as np
import pytest

import reference
from converter.bundle import BuildOptions, BundleError, load, write_bundle
from converter.loaders import open_checkpoint
from converter.ort_session import OrtDecoder
from converter.quant import get_scheme, quantize_rows
from converter.smooth import (SEARCH_CANDIDATES, SmoothedCheckpoint, _search, apply, candidate_name,
                              candidate_scales, smoothing_scales)
from manifests import read_manifest, write_manifest

IDS = [1, 5, 9, 2, 7, 3, 8, 4, 6, 10, 11, 12]


def _smoothing(ck, alpha=0.5):
    ids = np.random.default_rng(0).integers(3, ck.config.vocab_size, (2, 16))
    return smoothing_scales(ck, ck.config, ids, alpha, {"corpus": "test"})


def test_smoothing_is_exact_in_float(tiny_hf):
    """The scales cancel: the smoothed float weights give the original logits (float rounding only), while the
    weights themselves move (every linear of every layer, and both norms)."""
    folder, _ = tiny_hf
    ck = open_checkpoint(folder)
    sm = _smoothing(ck)
    w = {name: ck.load(name) for name in ck.tensors}
    ws = {name: apply(name, t, sm) for name, t in w.items()}
    assert len(sm.scales) == 9 * ck.config.num_hidden_layers
    for name in sm.scales:
        assert not np.allclose(ws[name], w[name]), name
    want = reference.forward(ck.config, w, IDS)
    got = reference.forward(ck.config, ws, IDS)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert np.array_equal(SmoothedCheckpoint(ck, sm).load("model.layers.0.mlp.up_proj.weight"),
                          ws["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int8-e4"])
def test_bundle_with_smoothing_records_it_and_runs(tiny_hf, tmp_path, scheme):
    folder, _ = tiny_hf
    out = tmp_path / "smoothed"
    m = write_bundle(open_checkpoint(folder), out, BuildOptions(scheme=scheme, smooth=0.5, chunk_symbols=4096))
    assert m["smoothing"]["alpha"] == 0.5 and m["smoothing"]["tokens"] == 2048
    assert m["smoothing"]["text"]["corpus"]
    logits = OrtDecoder(load(out)).forward_full(IDS)
    write_bundle(open_checkpoint(folder), tmp_path / "plain", BuildOptions(scheme=scheme, smooth="off",
                                                                           chunk_symbols=4096))
    assert "smoothing" not in load(tmp_path / "plain").manifest
    plain = OrtDecoder(load(tmp_path / "plain")).forward_full(IDS)
    ck = open_checkpoint(folder)
    want = reference.forward(ck.config, {name: ck.load(name) for name in ck.tensors}, IDS)
    err = lambda x: np.abs(x - want).max() / np.abs(want).max()  # noqa: E731
    # the same float model, rounded differently: not equal to the plain bundle, and about as close to the float
    # model (the tiny random model has no outlier channels for smoothing to win on; SmolLM2 does: README)
    assert np.isfinite(logits).all() and not np.array_equal(logits, plain)
    assert err(logits) < 1.5 * err(plain) + 0.02, (err(logits), err(plain))


def test_smoothing_is_refused_where_it_was_not_measured(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    with pytest.raises(BundleError, match="--smooth applies to int8, int4-g32/g64, int4-m32/m64, int8-eB"):
        write_bundle(open_checkpoint(folder), tmp_path / "x", BuildOptions(scheme="ternary", smooth=0.5))
    with pytest.raises(BundleError, match="alpha in"):
        write_bundle(open_checkpoint(folder), tmp_path / "y", BuildOptions(scheme="int8", smooth=1.5))
    with pytest.raises(BundleError, match="auto searches the weight-only schemes int4-g32/g64, int4-m32/m64, int8-eB"):
        write_bundle(open_checkpoint(folder), tmp_path / "z", BuildOptions(scheme="int8", smooth="auto"))
    assert not (tmp_path / "z").exists()


def test_smoothed_int8_eb_rows_keep_their_precision(tiny_hf):
    """int8-eB has one step per matrix. Where smoothing divided a weight's rows (v_proj, up_proj), each row's step
    is divided alike (row_relative), so every row is rounded as finely, relative to its weights, as unsmoothed —
    and the order-0 entropy still meets the target."""
    from converter.bundle import _smoothed
    from converter.quant import entropy
    from converter.smooth import row_relative

    ck = open_checkpoint(tiny_hf[0])
    smoothed = _smoothed(ck, BuildOptions(scheme="int8-e3", smooth="auto"), None)
    assert row_relative(ck, "model.layers.0.mlp.up_proj.weight") is None               # not smoothed
    assert row_relative(smoothed, "model.layers.0.self_attn.q_proj.weight") is None    # columns only
    for name, divisor in (("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
                          ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj.weight")):
        rows = smoothed.smoothing.scales[divisor][1]
        rel = row_relative(smoothed, name)
        assert np.allclose(rel, 1.0 / rows)
        w = smoothed.load(name)
        steps = entropy.row_steps(w, 3.0, relative=rel).astype(np.float64)
        floor = np.abs(w).max(axis=1) / 127
        free = steps > floor * 1.01                         # rows whose step is the target's, not the int8 floor
        ratio = steps[free] * rows.astype(np.float64)[free]
        assert free.sum() >= len(steps) // 2 and ratio.max() / ratio.min() < 1.002    # float16 rounding only
        codes = entropy.quantize_with_steps("int8-e3", w, entropy.row_steps(w, 3.0, relative=rel))
        assert abs(entropy.entropy_bits(codes.symbols.view(np.int8)) - 3.0) < 0.15
    with pytest.raises(Exception, match="relative row steps"):
        entropy.row_steps(np.ones((4, 32), np.float32), 3.0, relative=np.array([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("method", [None, "gptq"])
def test_smoothed_int8_eb_bundle_divides_the_row_steps(tiny_hf, tmp_path, method):
    """What the bundle holds: a smoothed int8-e3 build, plain or GPTQ-calibrated, stores up_proj's row steps
    times its row divisors as one number (float16 rounding only) wherever the int8 floor does not set the step."""
    from converter.bundle import _smoothed
    from converter.calibrate import CalibrationOptions

    ck = open_checkpoint(tiny_hf[0])
    cal = CalibrationOptions(method=method, sequences=4, seq_len=64, corpus_chars=20_000) if method else None
    m = write_bundle(ck, tmp_path / "b", BuildOptions(scheme="int8-e3", smooth="auto", chunk_symbols=4096,
                                                      calibration=cal))
    assert m["smoothing"]["alpha"] == "auto"
    rows = _smoothed(ck, BuildOptions(scheme="int8-e3", smooth="auto"), None).smoothing.scales[
        "model.layers.0.mlp.up_proj.weight"][1].astype(np.float64)
    scales = {e["name"]: a for e, a in load(tmp_path / "b").decode_initializers()}
    steps = scales["model.layers.0.mlp.up_proj.weight.scales"].reshape(len(rows), -1).astype(np.float64)
    assert (steps == steps[:, :1]).all()                                    # one step per row
    ratio = steps[:, 0] * rows
    top = ratio >= np.median(ratio)                                         # rows at the target step (not floored)
    assert rows.max() / rows.min() > 1.5 and ratio[top].max() / ratio[top].min() < 1.002, ratio


def _int4_qdq(w):
    sch = get_scheme("int4-g32")
    return sch.dequantize(quantize_rows(sch, w))


def _output_error(x, w, s):
    d = (x / s) @ _int4_qdq(w * s[None, :]).T - x @ w.T
    return float((d * d).sum())


def test_search_never_does_worse_than_no_smoothing_and_finds_outlier_channels():
    """On activations with a few channels 100x the rest, the search smooths and its quantized output error is
    well below the unsmoothed one; on plain Gaussian activations it still never measures worse than none."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (96, 128)).astype(np.float32)
    x = rng.normal(0, 1, (256, 128)).astype(np.float32)
    x_out = x.copy()
    x_out[:, [3, 40, 77]] *= 100
    for xs, outliers in ((x_out, True), (x, False)):
        stats = np.abs(xs).max(0), np.abs(xs).mean(0), np.abs(w).max(0)
        s, a = _search(xs, [w], *stats, SEARCH_CANDIDATES, _int4_qdq)
        none = _output_error(xs, w, np.ones(128, np.float32))
        assert a in SEARCH_CANDIDATES
        assert _output_error(xs, w, s) <= none
        for cand in SEARCH_CANDIDATES[1:]:   # it is the argmin over the candidates
            assert _output_error(xs, w, s) <= _output_error(xs, w, candidate_scales(cand, *stats)) + 1e-6
        if outliers:
            assert a is not None and _output_error(xs, w, s) < 0.5 * none, (a, _output_error(xs, w, s), none)


def test_int4_is_smoothed_by_default_and_int8_only_when_asked(tiny_hf, tmp_path):
    folder, _ = tiny_hf
    layers = open_checkpoint(folder).config.num_hidden_layers
    m = write_bundle(open_checkpoint(folder), tmp_path / "i4", BuildOptions(scheme="int4-g32", chunk_symbols=4096))
    sm = m["smoothing"]
    assert sm["alpha"] == "auto" and sum(sm["chosen"].values()) == 4 * layers   # q/k/v, o, gate/up, down
    assert set(sm["chosen"]) <= {candidate_name(c) for c in SEARCH_CANDIDATES}
    assert load(tmp_path / "i4").manifest["smoothing"] == sm                    # the record validates
    assert "smoothing" not in write_bundle(open_checkpoint(folder), tmp_path / "i8",
                                           BuildOptions(scheme="int8", chunk_symbols=4096))
    assert write_bundle(open_checkpoint(folder), tmp_path / "i8s", BuildOptions(
        scheme="int8", smooth="on", chunk_symbols=4096))["smoothing"]["alpha"] == 0.5
    assert "smoothing" not in write_bundle(open_checkpoint(folder), tmp_path / "t",
                                           BuildOptions(scheme="ternary", chunk_symbols=4096))


@pytest.mark.parametrize("bad", [{"alpha": 2.0}, {"tokens": -1}, {"text": "x"}, {"extra": 1}, {"alpha": "auto"},
                                 {"alpha": "auto", "chosen": {"max0.5": -1}}, {"alpha": "auto", "chosen": [1]},
                                 {"alpha": 0.5, "chosen": {"max0.5": 1}}])
def test_a_manifest_lying_about_its_smoothing_is_refused(tiny_hf, tmp_path, bad):
    folder, _ = tiny_hf
    out = tmp_path / "s"
    write_bundle(open_checkpoint(folder), out, BuildOptions(scheme="int8", smooth=0.5, chunk_symbols=4096))
    m = read_manifest(out)
    m["smoothing"] = {**m["smoothing"], **bad}
    write_manifest(out, m)
    with pytest.raises(BundleError, match="smoothing"):
        load(out)


def test_cli_smooth_flag(tiny_hf, tmp_path, capsys):
    """--smooth takes an alpha, auto, off or nothing (the scheme's best); a bad value is a usage error, not a
    traceback, and auto on int8 is refused by name."""
    from converter.cli import main

    folder = str(tiny_hf[0])
    assert main(["build", folder, "--scheme", "int4-g32", "--smooth", "off", "--out", str(tmp_path / "a")]) == 0
    assert "smoothing" not in load(tmp_path / "a").manifest
    assert main(["build", folder, "--scheme", "int8", "--smooth", "--out", str(tmp_path / "b")]) == 0
    assert load(tmp_path / "b").manifest["smoothing"]["alpha"] == 0.5
    with pytest.raises(SystemExit) as e:
        main(["build", folder, "--smooth", "1.5", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "alpha must be in (0, 1]" in capsys.readouterr().err
    assert main(["build", folder, "--scheme", "int8", "--smooth", "auto", "--out", str(tmp_path / "d")]) == 2
    out = capsys.readouterr()
    assert "auto searches the weight-only schemes" in out.out + out.err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64"])
def test_default_int4_bundle_matches_its_smoothed_dequantized_reference(tiny_hf, tmp_path, scheme):
    """The default (smoothed) int4 bundle holds exactly the smoothed checkpoint's weights quantized: its logits
    equal the numpy forward of those weights dequantized, as the unsmoothed bundles equal theirs (test_graph)."""
    from converter.bundle import _smoothed, resolve_smooth

    ck = open_checkpoint(tiny_hf[0])
    opts = BuildOptions(scheme=scheme, embed_scheme="int8-g32", chunk_symbols=4096)   # float activations throughout
    assert resolve_smooth(ck, opts) == "auto"
    write_bundle(ck, tmp_path / "b", opts)
    bundle = load(tmp_path / "b")
    smoothed = _smoothed(ck, BuildOptions(scheme=scheme, smooth="auto"), None)
    want = reference.forward(ck.config, reference.dequantized_weights(smoothed, scheme, "int8-g32"), IDS)
    got = OrtDecoder(bundle).forward_full(IDS)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-3
    plain = reference.forward(ck.config, reference.dequantized_weights(ck, scheme, "int8-g32"), IDS)
    assert np.abs(got - want).max() < np.abs(got - plain).max()           # it is the smoothed model, not the plain


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g64", "int4-g128"])
def test_roundtrip_is_dequantize_of_quantize(scheme):
    """The search's fast quantize -> dequantize is bit for bit the scheme's own, outliers and zero groups too."""
    sch = get_scheme(scheme)
    w = np.random.default_rng(2).standard_t(3, (40, 256)).astype(np.float32)
    w[3, :128] = 0.0
    w[7, 5] = 1e3
    assert np.array_equal(sch.roundtrip(w), sch.dequantize(sch.quantize(w)))


def test_candidate_scales_forms():
    """off is ones; the max form is SmoothQuant's; the mean form is AWQ's, centred so that its extremes multiply
    to 1 (the weights' overall range stays put), larger where the mean activation is."""
    x_max, x_mean, w_max = np.array([1.0, 4.0, 16.0]), np.array([0.5, 2.0, 8.0]), np.array([2.0, 2.0, 2.0])
    assert np.array_equal(candidate_scales(None, x_max, x_mean, w_max), np.ones(3, np.float32))
    np.testing.assert_allclose(candidate_scales(("max", 0.5), x_max, x_mean, w_max), [0.5 ** 0.5, 2 ** 0.5, 8 ** 0.5],
                               rtol=1e-6)
    s = candidate_scales(("mean", 0.5), x_max, x_mean, w_max)
    np.testing.assert_allclose(s, [0.5, 1.0, 2.0], rtol=1e-6)
    assert [candidate_name(c) for c in (None, ("mean", 0.75))] == ["off", "mean0.75"]


def test_inspect_lists_every_tensor_and_says_it_is_smoothed(tiny_hf, tmp_path, capsys):
    from converter.cli import main

    ck = open_checkpoint(tiny_hf[0])
    write_bundle(ck, tmp_path / "s", BuildOptions(scheme="int4-g32", chunk_symbols=4096))
    assert main(["inspect", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    for name in ck.tensors:
        assert name in out
    assert "bits/weight all-in" in out and "smoothed: alpha auto (" in out and "layer groups)" in out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "not a bundle folder" in err and "Traceback" not in err
