"""Fisher-weighted row steps (converter/fisher.py, `--fisher-rows`): the numpy decoder is the reference model, its
backward pass is the forward's derivative, the measured information is deterministic, and a build gives the rows of
q/k/v/up_proj the steps it says — at the same entropy — and records it."""
import json

import numpy as np
import pytest

import reference
from converter import fisher as FI
from converter.bundle import BundleError, load, manifest_digest
from converter.calibrate import CalibrationOptions, calibration_ids
from converter.loaders import open_checkpoint
from converter.quant.entropy import entropy_bits
from converter.smooth import SmoothedCheckpoint, smoothing_scales


def test_forward_is_the_reference_models(tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    w = {n: ck.load(n) for n in ck.tensors}
    ids = np.random.default_rng(0).integers(0, ck.config.vocab_size, (2, 17))
    z = FI.Decoder(ck.config, w).forward(ids).reshape(2, 17, -1)
    for b in range(2):
        np.testing.assert_allclose(z[b], reference.forward(ck.config, w, list(ids[b])), atol=2e-4, rtol=1e-4)


def test_output_gradients_match_finite_differences(tiny_hf, monkeypatch):
    """dL/dW = dyᵀ·x for every linear layer, with dy what backward hands out: checked on the largest entry of each
    matrix's gradient by central differences of the loss, in float64."""
    monkeypatch.setattr(FI, "F", np.float64)
    ck = open_checkpoint(tiny_hf[0])
    rng = np.random.default_rng(1)
    m = FI.Decoder(ck.config, {n: ck.load(n).astype(np.float64) for n in ck.tensors})
    ids = rng.integers(0, ck.config.vocab_size, (2, 9))
    target = rng.standard_normal((18, ck.config.vocab_size))         # loss: Σ target · log_softmax(z)

    def loss():
        return float((target * FI.log_softmax(m.forward(ids))).sum())

    m.keep_inputs = True
    z = m.forward(ids, keep=True)
    p = np.exp(FI.log_softmax(z))
    dz = target - p * target.sum(-1, keepdims=True)
    grads = {}
    m.backward(dz, lambda name, dy: grads.__setitem__(name, dy.T @ m.inputs[name]))
    m.keep_inputs = False
    mats = [n for n in ck.tensors if n.endswith("_proj.weight")]
    assert sorted(grads) == sorted(mats)
    worst = 0.0
    for n in mats:
        r, c = np.unravel_index(int(np.argmax(np.abs(grads[n]))), grads[n].shape)
        old, e = m.W[n][r, c], 1e-6
        m.W[n][r, c] = old + e
        up = loss()
        m.W[n][r, c] = old - e
        down = loss()
        m.W[n][r, c] = old
        num = (up - down) / (2 * e)
        worst = max(worst, abs(num - grads[n][r, c]) / max(1e-10, abs(num) + abs(grads[n][r, c])))
    assert worst < 1e-6, worst


def test_row_fisher_is_deterministic_and_covers_the_weighted_matrices(tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    ids = np.random.default_rng(2).integers(0, ck.config.vocab_size, (5, 16))
    a, b = FI.row_fisher(ck, ids), FI.row_fisher(ck, ids)
    layers = ck.config.num_hidden_layers
    assert len(a) == 4 * layers and all(FI.weighted(n) for n in a)
    assert {n.split(".")[-2] for n in a} == set(FI.FISHER_KINDS)
    for n, f in a.items():
        assert f.shape == (ck.tensors[n].shape[0],) and np.isfinite(f).all() and (f > 0).all()
        np.testing.assert_array_equal(f, b[n])
    c = FI.row_fisher(ck, ids, seed=1)                        # other sampled tokens, other numbers
    n = next(iter(a))
    assert not np.array_equal(a[n], c[n])


def test_relative_steps_follow_the_information():
    f = np.array([1.0, 4.0, 16.0, 0.25, 0.0])
    rel = FI.relative_steps(f)
    assert np.allclose(np.log2(rel) * FI.LEVELS_PER_OCTAVE, np.round(np.log2(rel) * FI.LEVELS_PER_OCTAVE))
    # four times the information: a step 4^(−β/2) = 1/√2 as large (β = 1/2), rounded to quarter octaves
    assert rel[1] / rel[0] == pytest.approx(2 ** (np.round(-0.5 * FI.LEVELS_PER_OCTAVE) / FI.LEVELS_PER_OCTAVE))
    assert rel[2] / rel[0] == 0.5                             # sixteen times the information: half the step
    assert rel[2] < rel[1] < rel[0] < rel[3]
    assert rel[4] == rel[3]                                   # unreached rows: the least informative measured one
    assert np.array_equal(FI.relative_steps(np.zeros(3)), np.ones(3))


def _rows(bundle, name):
    """(step of each row, codes as stored) of an int8-eB tensor of a bundle (one step per row, repeated per group)."""
    with bundle.open_initializers() as read:
        codes = read(name + ".q")
        codes = codes.reshape(codes.shape[0], -1)
        scales = read(name + ".scales").astype(np.float32).reshape(codes.shape[0], -1)
    assert (scales == scales[:, :1]).all()
    return scales[:, 0], codes


def test_fisher_rows_build_gives_those_rows_their_steps(tmp_path, tiny_hf):
    """int8-e3 with and without --fisher-rows (unsmoothed, GPTQ on pydoc): the weighted matrices' row steps are the
    plain steps' level times relative_steps(row_fisher) on the same calibration windows, the others are untouched,
    every matrix keeps its entropy target, and the manifest says what was done."""
    from converter.cli import main
    args = ["build", str(tiny_hf[0]), "--scheme", "int8-e3", "--calibrate", "gptq", "--calib-tokens", "256",
            "--smooth", "off", "--model-graph-only"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--fisher-rows", "--out", str(tmp_path / "fr")]) == 0
    plain, fr = load(tmp_path / "plain"), load(tmp_path / "fr")
    rec = fr.manifest["calibration"]["fisher_rows"]
    assert rec["kinds"] == list(FI.FISHER_KINDS) and rec["beta"] == FI.BETA and rec["positions"] == 256
    assert "fisher_rows" not in plain.manifest["calibration"]

    ck = open_checkpoint(tiny_hf[0])
    opts = CalibrationOptions(method="gptq", sequences=1, seq_len=256)
    ids, _ = calibration_ids(json.loads(ck.tokenizer_files()["tokenizer.json"]), opts)
    info = FI.row_fisher(ck, ids)
    layer0 = "model.layers.0."
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
        name = layer0 + kind + ".weight"
        steps, codes = _rows(fr, name)
        w = ck.load(name)
        floor = np.abs(w).max(1) / 127
        free = steps > 1.01 * floor                              # rows not held at their int8 floor
        assert free.sum() >= 2
        want = FI.relative_steps(info[name])[free]
        np.testing.assert_allclose(steps[free] / steps[free][0], want / want[0], rtol=2e-3)
        assert entropy_bits(codes) == pytest.approx(3, abs=0.15)
    for kind in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        name = layer0 + kind + ".weight"
        np.testing.assert_array_equal(_rows(fr, name)[0], _rows(plain, name)[0])


def test_fisher_rows_refused_where_it_does_not_apply(tmp_path, tiny_hf):
    from converter.cli import main
    assert main(["build", str(tiny_hf[0]), "--scheme", "int8-e3", "--fisher-rows", "--out", str(tmp_path / "x")]) == 2
    assert main(["build", str(tiny_hf[0]), "--scheme", "int4-g32", "--calibrate", "gptq", "--fisher-rows",
                 "--out", str(tmp_path / "y")]) == 2
    assert main(["build", str(tiny_hf[0]), "--scheme", "q4_0", "--calibrate", "gptq", "--calib-embedding",
                 "--fisher-rows", "--out", str(tmp_path / "z")]) == 2        # linear layers kept as they are
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_smoothed_rows_information_is_taken_back_to_the_unsmoothed_rows(tiny_hf):
    """calibrate measures F on the smoothed model (unsmoothed_row_fisher): smoothing divides v_proj's and up_proj's
    rows by d_r, so their gradients grow by d_r; taken back, the information equals the unsmoothed model's."""
    ck = open_checkpoint(tiny_hf[0])
    ids = np.random.default_rng(3).integers(0, ck.config.vocab_size, (4, 16))
    sm = smoothing_scales(ck, ck.config, ids[:2], 0.5, {"corpus": "test"})
    smoothed = SmoothedCheckpoint(ck, sm)
    plain, back, raw = FI.row_fisher(ck, ids), FI.unsmoothed_row_fisher(smoothed, ids), FI.row_fisher(smoothed, ids)
    moved = 0
    for n in plain:
        np.testing.assert_allclose(back[n], plain[n], rtol=2e-3, atol=1e-12)
        moved += not np.allclose(raw[n], plain[n], rtol=1e-2)
    assert moved == 2 * ck.config.num_hidden_layers                 # v_proj and up_proj of every layer


def test_manifest_fisher_rows_record_is_validated(tmp_path, tiny_hf):
    from converter.cli import main
    assert main(["build", str(tiny_hf[0]), "--scheme", "int8-e3", "--calibrate", "gptq", "--calib-tokens", "256",
                 "--fisher-rows", "--model-graph-only", "--out", str(tmp_path / "b")]) == 0
    path = tmp_path / "b" / "manifest.json"
    m = json.loads(path.read_text())
    m["calibration"]["fisher_rows"]["beta"] = "half"
    m["integrity"]["sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="calibration.fisher_rows.beta"):
        load(tmp_path / "b")
