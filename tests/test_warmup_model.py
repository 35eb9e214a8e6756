"""The warm-up model a bundle carries for the page (converter/warmup_model.py): written with the wasm graph only,
of the bundle's schemes and head layout, checked whole by load(), and a model onnxruntime runs."""
import json
import shutil

import numpy as np
import pytest

from converter.bundle import BuildOptions, load, write_bundle
from converter.errors import BundleError
from converter.loaders import open_checkpoint
from converter.warmup_model import DIR, HIDDEN, VOCAB, warmup_config


def test_a_bundle_with_a_wasm_graph_carries_its_warm_up_model(tiny_bundles):
    path = tiny_bundles("int4-g32")
    b = load(path)
    entry = b.manifest["warmup"]
    assert entry["dir"] == DIR
    files = list((path / DIR).iterdir())
    assert entry["bytes"] == sum(p.stat().st_size for p in files) < 64 << 10      # small next to any model
    w = load(path / DIR)
    assert (w.manifest["scheme"], w.manifest["embed_scheme"]) == (b.manifest["scheme"], b.manifest["embed_scheme"])
    assert w.config == warmup_config(b.config)
    assert (w.config.hidden_size, w.config.num_hidden_layers, w.config.vocab_size) == (HIDDEN, 1, VOCAB)
    assert w.config.head_dim == b.config.head_dim and w.config.rope_theta == b.config.rope_theta
    assert w.config.rope_scaling == b.config.rope_scaling
    assert "graph_wasm" in w.manifest and "graph_fp16" not in w.manifest and "warmup" not in w.manifest
    # counted in the bundle's size, as everything the page downloads (the manifest counts itself before its last
    # fields are written: within a few hundred bytes)
    on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert abs(b.manifest["totals"]["bundle_bytes"] - on_disk) < 512 < entry["bytes"]


def test_no_warm_up_model_without_a_wasm_graph(tmp_path, tiny_hf):
    ck = open_checkpoint(tiny_hf[0])
    for name, opts in (("f32", BuildOptions(scheme="f32", chunk_symbols=4096)),
                       ("graph-only", BuildOptions(scheme="int4-g32", chunk_symbols=4096, fp16_graph=False,
                                                   wasm_graph=False, smooth="off")),
                       ("off", BuildOptions(scheme="int4-g32", chunk_symbols=4096, warmup_model=False, smooth="off"))):
        m = write_bundle(ck, tmp_path / name, opts)
        assert "warmup" not in m and not (tmp_path / name / DIR).exists(), name


def test_the_warm_up_model_runs_and_is_the_same_every_build(tmp_path, tiny_bundles, tiny_hf):
    from converter.ort_session import OrtDecoder

    path = tiny_bundles("int8")
    dec = OrtDecoder(load(path / DIR), variant="graph_wasm")
    ids, vals = dec.forward(list(range(1, 9)), k=4)
    assert len(ids) == 4 and all(0 <= i < VOCAB for i in ids) and np.isfinite(vals).all()
    again = write_bundle(open_checkpoint(tiny_hf[0]), tmp_path / "again",
                         BuildOptions(scheme="int8", chunk_symbols=4096, smooth="off"))
    assert again["warmup"] == load(path).manifest["warmup"]          # same bytes, same manifest hash


@pytest.mark.parametrize("harm", ["flip a weight byte", "drop a file", "add a file", "drop the folder",
                                  "another config"])
def test_a_damaged_warm_up_model_is_refused_by_name(tmp_path, tiny_bundles, harm):
    work = tmp_path / "b"
    shutil.copytree(tiny_bundles("int4-g32"), work)
    sub = work / DIR
    if harm == "flip a weight byte":
        blob = sub / "weights-000.qzb"
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x10
        blob.write_bytes(bytes(data))
    elif harm == "drop a file":
        (sub / "tokenizer_config.json").unlink()
    elif harm == "add a file":
        (sub / "notes.txt").write_text("hi")
    elif harm == "drop the folder":
        shutil.rmtree(sub)
    else:                               # a valid bundle, but not the warm-up shape of this one's config
        from converter.bundle import manifest_digest
        m = json.loads((sub / "manifest.json").read_text())
        m["config"]["rope_theta"] *= 2
        m["integrity"] = {"sha256": manifest_digest(m)}
        (sub / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=f"{DIR}[:/]"):          # names the folder, then the file
        b = load(work)
        for _ in b.decode_initializers():
            pass
