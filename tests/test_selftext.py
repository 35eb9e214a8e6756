"""Calibration text sampled from the model itself (converter/selftext.py, `--calib-text generated`): it follows the
float model, is seeded, and a build records that its smoothing and calibration used it."""
import json

import numpy as np
import pytest

import reference
from converter.bundle import BuildOptions, load, write_bundle
from converter.calibrate import CalibrationOptions, calibrate
from converter.errors import QuantError
from converter.loaders import open_checkpoint
from converter.selftext import generated_ids, start_ids


def test_cold_sampling_is_the_float_models_greedy_continuation(tiny_hf):
    """At a temperature near 0 every window is the greedy continuation the numpy reference computes, token by
    token: the batched KV-cache loop feeds the right tokens at the right positions."""
    ck = open_checkpoint(tiny_hf[0])
    ids, info = generated_ids(ck, 2, 10, temperature=1e-4)
    w = {n: ck.load(n) for n in ck.tensors}
    seq = start_ids(ck)
    while len(seq) < 10:
        seq.append(int(np.argmax(reference.forward(ck.config, w, seq)[-1])))
    assert ids.tolist() == [seq, seq]
    assert info["corpus"] == "generated" and info["tokens"] == 20 and info["start_ids"] == seq[:1]


def test_sampling_is_seeded_and_spreads(tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    a, _ = generated_ids(ck, 4, 24)
    b, _ = generated_ids(ck, 4, 24)
    c, _ = generated_ids(ck, 4, 24, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({tuple(r) for r in a[:, 1:].tolist()}) == 4            # temperature 1: the windows differ
    assert a.min() >= 0 and a.max() < ck.config.vocab_size


def test_windows_start_at_a_document_boundary(tiny_hf, tmp_path):
    """<|begin_of_text|> (Llama 3), else <|endoftext|> (SmolLM2, whose configured beginning-of-sequence token is the
    chat marker <|im_start|>), else the config's beginning-of-sequence id, else its first end-of-sequence id."""
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    base = [t for t in tok.get("added_tokens", []) if not any(k in t["content"] for k in ("endoftext", "_of_text"))]

    def write(added, **config):
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))
        (folder / "tokenizer.json").write_text(json.dumps({**tok, "added_tokens": base + added}))
        (folder / "generation_config.json").unlink(missing_ok=True)
        return start_ids(open_checkpoint(folder))

    end = {"id": 7, "content": "<|endoftext|>", "special": True}
    begin = {"id": 9, "content": "<|begin_of_text|>", "special": True}
    assert write([end], bos_token_id=3, eos_token_id=5) == [7]
    assert write([end, begin], bos_token_id=3, eos_token_id=5) == [9]
    assert write([{**end, "special": False}], bos_token_id=3, eos_token_id=5) == [3]
    assert write([], bos_token_id=None, eos_token_id=5) == [5]


def test_build_calibrates_and_smooths_on_the_generated_text(tiny_hf, tmp_path):
    ck = open_checkpoint(tiny_hf[0])
    opts = CalibrationOptions(method="gptq", sequences=4, seq_len=32, embedding="calibrated", source_text="generated")
    m = write_bundle(ck, tmp_path / "b", BuildOptions(scheme="int8-e3", embed_scheme="int8-e4", chunk_symbols=4096,
                                                      calibration=opts))
    assert m["calibration"]["source_text"] == "generated"
    assert m["calibration"]["text"]["corpus"] == "generated" and m["calibration"]["text"]["tokens"] == 4 * 32
    assert m["smoothing"]["text"]["corpus"] == "generated" and m["smoothing"]["text"]["tokens"] == 8 * 32
    assert load(tmp_path / "b").manifest["calibration"] == m["calibration"]           # the record validates
    plain = write_bundle(ck, tmp_path / "p", BuildOptions(scheme="int8-e3", embed_scheme="int8-e4",
                                                          chunk_symbols=4096, calibration=CalibrationOptions(
                                                              method="gptq", sequences=8, seq_len=32,
                                                              embedding="calibrated", corpus_chars=20_000)))
    assert plain["calibration"]["text"]["corpus"] != "generated"
    assert [b["sha256"] for b in m["blobs"]] != [b["sha256"] for b in plain["blobs"]]   # other text, other codes
    with pytest.raises(QuantError, match="pass its windows"):
        calibrate(ck, "int8-e3", "int8-e4", opts)
    with pytest.raises(QuantError, match="calibration text must be one of"):
        CalibrationOptions(source_text="wiki").check("int8-e3")


def test_cli_calib_text(tiny_hf, tmp_path, capsys):
    from converter.cli import main

    folder = str(tiny_hf[0])
    assert main(["build", folder, "--scheme", "int8-e3", "--calibrate", "gptq", "--calib-tokens", "256",
                 "--calib-text", "generated", "--out", str(tmp_path / "a")]) == 0
    assert load(tmp_path / "a").manifest["calibration"]["text"]["corpus"] == "generated"
    assert main(["build", folder, "--scheme", "int8-e3", "--calib-text", "generated",
                 "--out", str(tmp_path / "b")]) == 2
    out = capsys.readouterr()
    assert "--calib-text applies to calibrated builds" in out.out + out.err
    assert not (tmp_path / "b").exists()
