"""Distillation of the row factors and norm weights (converter/distill.py, `--distill`): the hand-written backward
pass is the forward's derivative, training lowers the KL against the float model on text it did not see, and the
bundle keeps the calibrated codes with each row's steps multiplied by its factor."""
import numpy as np
import pytest

import reference
from converter import distill as D
from converter.bundle import BuildOptions, BundleError, load, write_bundle
from converter.calibrate import CalibrationOptions, calibrate
from converter.errors import QuantError
from converter.loaders import open_checkpoint
from converter.quant import get_scheme
from converter.selftext import generated_ids

DOPTS = D.DistillOptions(tokens=8 * 32, seq_len=32, batch=4, epochs=5, lr=1e-2)
COPTS = CalibrationOptions(method="gptq", sequences=4, seq_len=32, embedding="calibrated", corpus_chars=20_000)


def test_forward_is_the_reference_models(tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    w = {n: ck.load(n) for n in ck.tensors}
    ids = np.random.default_rng(0).integers(0, ck.config.vocab_size, (2, 17))
    z = D.Llama(ck.config, w).forward(ids).reshape(2, 17, -1)
    for b in range(2):
        np.testing.assert_allclose(z[b], reference.forward(ck.config, w, list(ids[b])), atol=2e-4, rtol=1e-4)


def test_backward_matches_finite_differences(tiny_hf, monkeypatch):
    """Every kind of parameter (each matrix's row factors, each norm), float64, central differences."""
    monkeypatch.setattr(D, "F", np.float64)
    ck = open_checkpoint(tiny_hf[0])
    rng = np.random.default_rng(1)
    m = D.Llama(ck.config, {n: ck.load(n).astype(np.float64) for n in ck.tensors})
    for n in m.mats:
        m.alpha[n] = 1 + 0.1 * rng.standard_normal(m.alpha[n].shape)
    ids = rng.integers(0, ck.config.vocab_size, (2, 9))
    ref = D.log_softmax(rng.standard_normal((18, ck.config.vocab_size)))
    loss, dz = D.kl_and_grad(m.forward(ids, keep=True), ref)
    grads = m.backward(dz)
    params = {**{("alpha", n): m.alpha[n] for n in m.mats}, **{("norm", n): m.W[n] for n in m.norms}}
    assert len(params) == len(grads)
    worst = 0.0
    for key, p in params.items():
        j = int(np.argmax(np.abs(grads[key])))       # the largest gradient entry, and a token row for the vocabulary
        for k in {j, int(ids[0, 0]) if key == ("alpha", D.EMBED) else 0}:
            old, e = p[k], 1e-6
            p[k] = old + e
            up = D.kl_and_grad(m.forward(ids), ref)[0]
            p[k] = old - e
            down = D.kl_and_grad(m.forward(ids), ref)[0]
            p[k] = old
            num = (up - down) / (2 * e)
            worst = max(worst, abs(num - grads[key][k]) / max(1e-10, abs(num) + abs(grads[key][k])))
    assert worst < 1e-5, worst


def _kl(cfg, weights, floats, ids):
    zs = D.Llama(cfg, floats).forward(ids)
    return D.kl_and_grad(D.Llama(cfg, weights).forward(ids), D.log_softmax(zs))[0]


def test_distilling_lowers_held_out_kl_and_keeps_the_codes(tiny_hf):
    """On text sampled with another seed than the training text; the codes are calibrate's, only the steps move."""
    ck = open_checkpoint(tiny_hf[0])
    cfg = ck.config
    floats = {n: ck.load(n) for n in ck.tensors}
    held_out, _ = generated_ids(ck, 4, 32, seed=5)
    calib = calibrate(ck, "int8-e3", "int8-e3", COPTS)
    try:
        before = {n: calib.get(n) for n in calib.spill.names}
        deq = {n: get_scheme(calib.schemes[n]).dequantize(q) for n, q in before.items()}
        tuned, record = D.distill(ck, calib, DOPTS)
        after = {n: calib.get(n) for n in calib.spill.names}
        tuned_w = {n: (get_scheme(calib.schemes[n]).dequantize(after[n]) if n in after else tuned.load(n))
                   for n in ck.tensors}
    finally:
        calib.close()
    plain = {n: deq.get(n, floats[n]) for n in ck.tensors}
    k0, k1 = _kl(cfg, plain, floats, held_out), _kl(cfg, tuned_w, floats, held_out)
    assert k1 < 0.9 * k0, (k0, k1)
    assert record["train_kl_last_epoch"] < record["train_kl_first_epoch"]
    changed = 0
    for n, q in after.items():
        np.testing.assert_array_equal(q.symbols, before[n].symbols)
        ratio = q.scales.astype(np.float64) / before[n].scales.astype(np.float64)
        np.testing.assert_allclose(ratio, ratio[:, :1].repeat(ratio.shape[1], 1), rtol=2e-3)   # one factor a row
        changed += not np.allclose(ratio, 1, atol=1e-3)
    assert changed == len(after)
    norms = [n for n in ck.tensors if floats[n].ndim == 1]
    assert any(not np.allclose(tuned.load(n), floats[n]) for n in norms)


def test_a_distilled_bundle_records_it_and_runs(tiny_hf, tmp_path):
    ck = open_checkpoint(tiny_hf[0])
    m = write_bundle(ck, tmp_path / "d", BuildOptions(scheme="int8-e3", embed_scheme="int8-e3", chunk_symbols=4096,
                                                      calibration=COPTS, distill=DOPTS))
    rec = m["calibration"]["distillation"]
    assert rec["tokens"] == 8 * 32 and rec["train_kl_last_epoch"] < rec["train_kl_first_epoch"]
    b = load(tmp_path / "d")
    assert b.manifest["calibration"]["distillation"] == rec
    from converter.ort_session import OrtDecoder
    logits = OrtDecoder(b).forward_full([1, 2, 3, 4])
    assert logits.shape == (4, ck.config.vocab_size) and np.isfinite(logits).all()


def test_distill_refuses_what_it_cannot_fit(tiny_hf, tmp_path):
    ck = open_checkpoint(tiny_hf[0])
    with pytest.raises(BundleError, match="add --calibrate"):
        write_bundle(ck, tmp_path / "a", BuildOptions(scheme="int8-e3", distill=DOPTS))
    with pytest.raises(QuantError, match="model.embed_tokens.weight is not one"):
        write_bundle(ck, tmp_path / "b", BuildOptions(scheme="int8-e3", embed_scheme="int8-e3", distill=DOPTS,
                                                      calibration=CalibrationOptions(
                                                          method="gptq", sequences=2, seq_len=32,
                                                          corpus_chars=20_000)))
    with pytest.raises(QuantError, match="at least one window"):
        D.DistillOptions(tokens=10).check()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
