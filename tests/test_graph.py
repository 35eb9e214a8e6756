"""The ONNX graph against the numpy reference, per scheme, and the KV cache against a full recompute."""
import numpy as np
import onnx
import pytest

import reference
from converter.bundle import graph_initializers, load
from converter.loaders import open_checkpoint
from converter.onnx_export import check_graph
from converter.ort_session import OrtDecoder

IDS = [5, 17, 42, 99, 3, 250, 7, 7, 300, 11]
QUANT_SCHEMES = ["int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128", "int4-m32", "int4-m64", "int2-g64", "ternary",
                 "ternary-g64", "f16"]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_f32_matches_numpy_reference(tiny_hf, tiny_bundles):
    folder, weights = tiny_hf
    ck = open_checkpoint(folder)
    want = reference.forward(ck.config, weights, IDS)
    got = OrtDecoder(load(tiny_bundles("f32"))).forward_full(IDS)
    assert _rel(got, want) < 1e-4


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_quantized_matches_its_dequantized_reference(tiny_hf, tiny_bundles, scheme):
    folder, _ = tiny_hf
    ck = open_checkpoint(folder)
    bundle = load(tiny_bundles(scheme))
    w = reference.dequantized_weights(ck, scheme, bundle.manifest["embed_scheme"])
    want = reference.forward(ck.config, w, IDS)
    got = OrtDecoder(bundle).forward_full(IDS)
    # DynamicQuantizeMatMul also quantizes activations to uint8 per tensor, so its error floor is higher
    dqmm = {bundle.manifest["scheme"], bundle.manifest["embed_scheme"]} & {"int8", "ternary"}
    tol = 6e-2 if dqmm else 1e-3
    assert _rel(got, want) < tol, scheme


@pytest.mark.parametrize("embed_scheme", ["int4-g32", "int4-m32", "int8-g32", "int2-g64", "f32"])
def test_embedding_schemes(tiny_hf, tiny_bundles, embed_scheme):
    folder, _ = tiny_hf
    ck = open_checkpoint(folder)
    bundle = load(tiny_bundles("int4-g32", embed_scheme))
    want = reference.forward(ck.config, reference.dequantized_weights(ck, "int4-g32", embed_scheme), IDS)
    got = OrtDecoder(bundle).forward_full(IDS)
    assert _rel(got, want) < 1e-3


@pytest.mark.parametrize("scheme,embed,tol,variant", [("f32", None, 1e-4, "graph"),
                                                      ("int4-g32", "int8-g32", 1e-4, "graph"),
                                                      ("int4-g32", "int8-g32", 1e-4, "graph_wasm"),
                                                      ("int4-m32", "int8-g32", 0.05, "graph_wasm"),
                                                      ("int8", "int8", 0.05, "graph")])
def test_cached_decode_equals_full_recompute(tiny_bundles, scheme, embed, tol, variant):
    """Exact for float and MatMulNBits graphs, and for the wasm graph (activations quantized per group of a row, so
    a one-row step sees the numbers of the prefill). int8 (and int4-mG's wasm graph, which quantizes activations
    per row as int8 does): close, not equal — a float rounding that differs between the many-row and the one-row
    path can move a per-row activation across a code boundary."""
    dec = OrtDecoder(load(tiny_bundles(scheme, embed)), variant=variant)
    full = dec.forward_full(IDS)
    dec.reset()
    steps = [dec.run(np.asarray([IDS[:4]]))[0, -1]]
    for t in IDS[4:]:
        steps.append(dec.run(np.asarray([[t]]))[0, -1])
    steps = np.stack(steps)
    assert _rel(steps, full[3:]) < tol
    assert (steps.argmax(-1) == full[3:].argmax(-1)).all()


def test_left_padded_batch_matches_single(tiny_bundles):
    """Batch of two prompts of different lengths (left padding) equals each run alone."""
    dec = OrtDecoder(load(tiny_bundles("f32")))
    a, b = IDS[:6], IDS[:3]
    solo_a = dec.forward_full(a)[-1]
    solo_b = dec.forward_full(b)[-1]
    dec.reset(batch=2)
    ids = np.asarray([a, [0] * 3 + b])
    mask = np.asarray([[1] * 6, [0] * 3 + [1] * 3])
    out = dec.run(ids, mask)
    np.testing.assert_allclose(out[0, -1], solo_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[1, -1], solo_b, rtol=1e-4, atol=1e-4)


def test_graph_passes_checker_and_names_are_hierarchical(tiny_bundles):
    bundle = load(tiny_bundles("int4-g32"))
    model = onnx.load_from_string(bundle.graph_bytes())
    check_graph(model)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    assert "/model/layers.0/attn/q_proj/MatMulNBits" in names
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "present.1.value" in [o.name for o in model.graph.output]


# ---- the float16 variant (model.fp16.onnx): same weights, float16 activations and KV cache -----------------------

@pytest.mark.parametrize("scheme,tol", [("f32", 1e-2), ("int4-g32", 1e-2), ("int4-m32", 1e-2), ("int2-g64", 1e-2),
                                        ("int8", 5e-2), ("ternary", 5e-2)])
def test_fp16_graph_follows_the_fp32_graph(tiny_bundles, scheme, tol):
    """Same initializers, float16 KV cache, float32 logits within float16 rounding of the float32 graph, and the
    same greedy choices wherever the float32 graph has no near-tie. (int8/ternary quantize activations per token:
    a float16 rounding that moves an activation across a code boundary moves it by a whole code, hence the
    looser bound, as between onnxruntime's CPU and wasm kernels.)"""
    bundle = load(tiny_bundles(scheme))
    model = onnx.load_from_string(bundle.graph_bytes(float16=True))
    check_graph(model)
    f32_inits = {t.name: (t.data_type, list(t.dims)) for t in onnx.load_from_string(bundle.graph_bytes()).graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL} == f32_inits
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert types["past_key_values.0.key"] == types["present.1.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT

    want = OrtDecoder(bundle).forward_full(IDS)
    dec = OrtDecoder(bundle, float16=True)
    got = dec.forward_full(IDS)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert _rel(got, want) < tol, scheme
    top2 = np.sort(want, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05 * np.abs(want).max()    # positions whose argmax is not a near-tie
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_fp16_graph_cached_decode_and_padding(tiny_bundles):
    """The float16 cache fed back step by step equals the prefill; a fully masked (padding) row stays finite."""
    dec = OrtDecoder(load(tiny_bundles("f32")), float16=True)
    full = dec.forward_full(IDS)
    dec.reset()
    steps = [dec.run(np.asarray([IDS[:4]]))[0, -1]]
    for t in IDS[4:]:
        steps.append(dec.run(np.asarray([[t]]))[0, -1])
    assert dec.past["past_key_values.0.key"].dtype == np.float16
    assert _rel(np.stack(steps), full[3:]) < 1e-2
    dec.reset(batch=2)
    out = dec.run(np.asarray([IDS[:4], [0, 0, 0, 0]]), np.asarray([[1, 1, 1, 1], [0, 0, 0, 0]]))
    assert np.isfinite(out).all()


def test_bundle_without_fp16_graph_says_so(tiny_hf, tmp_path):
    from converter.bundle import BuildOptions, BundleError, write_bundle

    folder, _ = tiny_hf
    out = tmp_path / "no-fp16"
    write_bundle(open_checkpoint(folder), out, BuildOptions(scheme="int8", fp16_graph=False))
    b = load(out)
    assert not (out / "model.fp16.onnx").exists() and "graph_fp16" not in b.manifest
    with pytest.raises(BundleError, match="no float16 graph"):
        b.graph_bytes(float16=True)


# ---- the wasm variant (model.wasm.onnx): group schemes as batched integer GEMMs ----------------------------------

def _act_blocks(ck, bundle) -> dict[str, int]:
    """Block size of the activation quantization in front of each quantized linear of the wasm graph: the group
    size for group schemes, the whole row for per-channel int8/ternary."""
    from converter.quant import get_scheme
    m = bundle.manifest
    out = {}
    for t in m["tensors"]:
        if len(t["shape"]) == 2 and t["scheme"] not in ("f32", "f16"):
            group = get_scheme(t["scheme"]).group
            out[t["name"]] = t["shape"][1] if t["scheme"].startswith("int4-m") else group or t["shape"][1]
    return out


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g128", "int4-m32", "int4-m64", "int2-g64", "ternary-g64",
                                    "int8-g32", "q4_0", "q4_1", "q8_0"])
def test_group_gemm_linear_is_exact(scheme):
    """One linear of the wasm graph equals x quantized per group (uint8, zero point 128, max|x| / 127) times the
    dequantized weights, to float32 rounding: the unpacking, transposes and zero points are right. With the scales
    and zero points as the loaders' tables (layouts.group_table, what bundles offer now) the output is bit for bit
    the graph's own unpacking of the stored initializers (what onnxruntime folded before)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from converter.layouts import group_table, linear_initializers, multiplied_codes, transposed_codes
    from converter.lzw import pack_symbols
    from converter.onnx_export import MS_DOMAIN, OPSET, GraphBuilder, linear
    from converter.quant import get_scheme
    rng = np.random.default_rng(1)
    K, N = 256, 48
    s = get_scheme(scheme)
    q = s.quantize(rng.standard_normal((N, K)).astype(np.float32))
    inits = linear_initializers("w", q)
    arrays = {i.name: np.frombuffer(pack_symbols(i.symbols.tobytes(), i.layout, i.bias), i.dtype).reshape(i.shape)
              for i in inits}
    layout = next(i.layout for i in inits if i.name == "w.q")
    codes_shape = arrays["w.q"].shape
    if "w.mults" in arrays:          # int4-mG: int8 (q - z)·m [K,N], the zero points and multipliers folded in
        arrays["w.q.kn"] = multiplied_codes(arrays.pop("w.q"), arrays.pop("w.zeros"), arrays.pop("w.mults"), layout)
        assert arrays["w.q.kn"].dtype == np.int8 and arrays["w.q.kn"].shape == (K, N)
        assert np.abs(arrays["w.q.kn"].astype(int)).max() <= 120
    else:
        arrays["w.q.kn"] = transposed_codes(arrays.pop("w.q"), layout)             # as the loaders derive it
    tabled = dict(arrays)
    for part in ("w.scales", "w.zeros"):
        if part in tabled:
            tabled[part + ".kn"] = group_table(tabled.pop(part), codes_shape, layout)
    x = rng.standard_normal((1, 3, K)).astype(np.float32)

    def run(arrays):
        g = GraphBuilder({n: (a.dtype.name, a.shape) for n, a in arrays.items()}, group_gemm=True)
        g.nodes.append(helper.make_node("Identity", [linear(g, "x", "w", scheme, K, N, "/lin")], ["y"]))
        tensors = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
        model = helper.make_model(helper.make_graph(
            g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=g.consts + tensors),
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)], ir_version=10)
        ops = {n.op_type for n in model.graph.node}
        assert "MatMulNBits" not in ops
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # no folding: the graph's own
        return ops, ort.InferenceSession(model.SerializeToString(), so,
                                         providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    ops, got = run(arrays)
    tabled_ops, got_tabled = run(tabled)
    if "w.scales.kn" in tabled:                                   # no Cast of the scales, no unpacking of zeros
        assert "Cast" in ops and not {"BitShift", "BitwiseAnd"} & tabled_ops
        assert "Cast" not in tabled_ops or "w.mins" in arrays                   # (q4_1's minimums stay a Cast)
    assert np.array_equal(got, got_tabled)
    x64, w64 = x[0].astype(np.float64), s.dequantize(q).astype(np.float64)
    offsets = 0.0
    if q.mins is not None:       # q4_1's w = d*q + m: the m part multiplies the float x (its block sums)
        m = np.repeat(q.mins.astype(np.float64), s.group, axis=1)
        w64, offsets = w64 - m, x64 @ m.T
    act_block = K if q.mults is not None else s.group       # int4-mG: activations quantized per row (int8_linear)
    want = reference.quantize_activation(x64, act_block) @ w64.T + offsets
    assert _rel(got[0], want) < 1e-5


@pytest.mark.parametrize("scheme,embed", [("int4-g32", "int8-g32"), ("int4-g64", None), ("int4-g128", "int4-g32"),
                                          ("int4-m32", "int8-g32"), ("int4-m64", None), ("int4-m32", "int4-m32"),
                                          ("int2-g64", None), ("ternary-g64", None), ("int8-g32", "int8")])
def test_wasm_graph_follows_its_reference(tiny_hf, tiny_bundles, scheme, embed):
    """Same initializers as model.onnx, no MatMulNBits; the logits follow the dequantized numpy forward with
    activations quantized per group as the graph does. Not to the last bit: a float32 rounding that moves an
    activation across a code boundary moves it by a whole code (as for int8, test above), so the bound is loose and
    greedy choices must agree wherever the reference has no near-tie."""
    folder, _ = tiny_hf
    ck = open_checkpoint(folder)
    bundle = load(tiny_bundles(scheme, embed))
    model = onnx.load_from_string(bundle.graph_bytes(variant="graph_wasm"))
    check_graph(model)
    ext = {t.name: list(t.dims) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    transposed = bundle.manifest["graph_wasm"]["transposed"]
    multiplied = bundle.manifest["graph_wasm"].get("multiplied", {})    # int4-mG: int8 codes, no zeros or mults
    assert bool(multiplied) == scheme.startswith("int4-m")
    assert transposed or multiplied
    assert {n: s for n, (_, s) in graph_initializers(bundle.manifest, "graph_wasm").items()} == ext
    pieces = bundle.manifest["graph_wasm"].get("pieces", {})   # int4-mG's layer codes: read in pieces of columns
    assert not any(n + ".kn" in pieces for n in multiplied)   # the tiny model's matrices are below their size
    assert all((n + ".kn" in ext) != (n + ".kn" in pieces) and (n in ext) == keep
               for n, keep in {**transposed, **multiplied}.items())
    assert not any(n[:-2] + part in ext for n in multiplied for part in (".zeros", ".mults"))
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" not in ops and "MatMulIntegerToFloat" in ops
    w = reference.dequantized_weights(ck, scheme, bundle.manifest["embed_scheme"])
    want = reference.forward(ck.config, w, IDS, act_blocks=_act_blocks(ck, bundle))
    got = OrtDecoder(bundle, variant="graph_wasm").forward_full(IDS)
    assert _rel(got, want) < 6e-2, scheme
    top2 = np.sort(want, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_vocabulary_pieces_layout():
    """layouts.piece_width: the largest divisor of V not above 768 nor V / 2 (SmolLM2's and Llama 3's vocabularies
    both cut into pieces of 768); column_pieces: piece p holds columns p·n .. p·n + n − 1 of every row."""
    from converter.layouts import piece_width, column_pieces
    assert piece_width(49152) == 768 and piece_width(128256) == 768 and piece_width(384) == 192
    assert piece_width(32003) is None and piece_width(40) is None      # no divisor from 32 up: one plain table
    t = np.arange(4 * 12, dtype=np.int8).reshape(4, 12)
    p = column_pieces(t, 3)
    assert p.shape == (4, 4, 3) and p.flags.c_contiguous
    for v in range(12):
        assert np.array_equal(p[v // 3, :, v % 3], t[:, v])


def test_wasm_graph_reads_int8_tables_in_pieces(tmp_path, tiny_hf, tiny_bundles, monkeypatch):
    """The wasm graph reads its int8 (K, N) tables as (P, K, n) pieces of columns, each matmul one batched GEMM
    (up to 2.3× faster on onnxruntime-web's wasm kernels): an int8 embedding's (H, V) table, which the lm_head
    multiplies and the embedding gathers its rows from (GatherND), and int4-mG's multiplied layer codes. The logits
    are bit for bit those of the same bundle's wasm graph built without pieces, with one session and with staged
    ones; no initializer is held twice."""
    import converter.bundle as bundle_mod
    from converter.bundle import BuildOptions, write_bundle
    from converter.layouts import LAYER_PIECE_MAX, LAYER_PIECE_MIN_WEIGHTS, piece_width
    opts = BuildOptions(scheme="int4-m32", embed_scheme="int8", chunk_symbols=4096, smooth="off")
    assert "pieces" in load(tiny_bundles("int4-m32", "int8")).manifest["graph_wasm"]
    assert 128 * 256 < LAYER_PIECE_MIN_WEIGHTS          # the tiny layers are cut as a 1B model's would be
    monkeypatch.setattr(bundle_mod, "LAYER_PIECE_MIN_WEIGHTS", 0)
    write_bundle(open_checkpoint(tiny_hf[0]), tmp_path / "pieces", opts)
    bundle = load(tmp_path / "pieces")
    table = "model.embed_tokens.weight.q"
    pieces = bundle.manifest["graph_wasm"]["pieces"]
    layers = {n: w for n, w in pieces.items() if n != table}
    multiplied = bundle.manifest["graph_wasm"]["multiplied"]
    assert pieces[table] == 192 and set(layers) == {n + ".kn" for n in multiplied}
    model = onnx.load_from_string(bundle.graph_bytes(variant="graph_wasm"))
    ext = {t.name: list(t.dims) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert ext[table + ".pieces"] == [2, 128, 192] and table not in ext
    for n, w in layers.items():
        k, cols = ext[n + ".pieces"][1], ext[n + ".pieces"][0] * w
        assert w == piece_width(cols, LAYER_PIECE_MAX) and ext[n + ".pieces"] == [cols // w, k, w] and n not in ext
    assert {n: s for n, (_, s) in graph_initializers(bundle.manifest, "graph_wasm").items()} == ext
    readers = [n.op_type for n in model.graph.node if table + ".pieces" in n.input]
    assert sorted(readers) == ["GatherND", "MatMulIntegerToFloat"]
    monkeypatch.setattr(bundle_mod, "piece_width", lambda *args: None)
    write_bundle(open_checkpoint(tiny_hf[0]), tmp_path / "whole", opts)
    whole = load(tmp_path / "whole")
    assert "pieces" not in whole.manifest["graph_wasm"]
    want = OrtDecoder(whole, variant="graph_wasm").forward_full(IDS)
    np.testing.assert_array_equal(OrtDecoder(bundle, variant="graph_wasm").forward_full(IDS), want)
    np.testing.assert_array_equal(OrtDecoder(bundle, variant="graph_wasm", low_memory=True).forward_full(IDS), want)


def test_wasm_graph_keeps_its_kv_cache_in_float16(tiny_bundles):
    """The wasm graph stores the cache in float16 (half the bytes the page copies in and out of onnxruntime-web's
    heap at every step) and attends in float32; model.onnx keeps float32. Both runtimes read the type from the
    graph: one session and the staged sessions feed float16, and their logits agree with each other."""
    bundle = load(tiny_bundles("int4-g32", "int8-g32"))
    for variant, want in (("graph_wasm", onnx.TensorProto.FLOAT16), ("graph", onnx.TensorProto.FLOAT)):
        model = onnx.load_from_string(bundle.graph_bytes(variant=variant))
        kv = [v for v in list(model.graph.input) + list(model.graph.output) if "key" in v.name or "value" in v.name]
        assert kv and {v.type.tensor_type.elem_type for v in kv} == {want}, variant
    one = OrtDecoder(bundle, variant="graph_wasm")
    staged = OrtDecoder(bundle, variant="graph_wasm", low_memory=True)
    assert one.kv_dtype == staged.kv_dtype == np.float16
    assert OrtDecoder(bundle).kv_dtype == np.float32
    a = one.run(np.asarray([IDS[:5]]))[0, -1]
    b = staged.run(np.asarray([IDS[:5]]))[0, -1]
    assert one.past["past_key_values.0.key"].dtype == np.float16 and np.array_equal(a, b)
    assert np.array_equal(one.run(np.asarray([[IDS[5]]]))[0, -1], staged.run(np.asarray([[IDS[5]]]))[0, -1])


@pytest.mark.parametrize("scheme,embed", [("int4-g32", "int4-g32"), ("int4-g64", None), ("int2-g64", None)])
def test_int8_compute_follows_its_reference(tiny_hf, tiny_bundles, scheme, embed):
    """OrtDecoder(int8_compute=True): every MatMulNBits multiplies in int8 (accuracy_level 4), the bundle's graph
    unchanged. The logits move off the float-compute ones and follow the dequantized forward with activations
    quantized per group, with the wasm graph's bound (a float32 rounding that moves an activation across a code
    boundary moves it by a whole code) and the same greedy choices where the reference has no near-tie; the staged
    sessions get it too."""
    from converter.ort_session import set_int8_compute
    folder, _ = tiny_hf
    ck = open_checkpoint(folder)
    bundle = load(tiny_bundles(scheme, embed))
    model = onnx.load_from_string(bundle.graph_bytes())
    n = sum(node.op_type == "MatMulNBits" for node in model.graph.node)
    assert n > 0 and set_int8_compute(model) == n
    assert all(a.i == 4 for node in model.graph.node if node.op_type == "MatMulNBits"
               for a in node.attribute if a.name == "accuracy_level")
    w = reference.dequantized_weights(ck, scheme, bundle.manifest["embed_scheme"])
    want = reference.forward(ck.config, w, IDS, act_blocks=_act_blocks(ck, bundle))
    floats = OrtDecoder(bundle).forward_full(IDS)
    got = OrtDecoder(bundle, int8_compute=True).forward_full(IDS)
    assert _rel(got, floats) > 1e-5                       # it does change the kernels
    assert _rel(got, want) < 6e-2, scheme
    top2 = np.sort(want, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()
    staged = OrtDecoder(bundle, int8_compute=True, low_memory=True).forward_full(IDS)
    np.testing.assert_array_equal(staged, got)


def test_int8_compute_needs_the_float32_graph(tiny_bundles):
    from converter.errors import TinyQMoEError
    with pytest.raises(TinyQMoEError, match="float32 graphs only"):
        OrtDecoder(load(tiny_bundles("int4-g32")), float16=True, int8_compute=True)


def test_wasm_graph_only_for_quantized_schemes(tiny_bundles):
    from converter.errors import BundleError
    assert "graph_wasm" in load(tiny_bundles("int4-g32")).manifest
    b = load(tiny_bundles("f32"))
    assert "graph_wasm" not in b.manifest and not (b.path / "model.wasm.onnx").exists()
    with pytest.raises(BundleError, match="no wasm graph"):
        b.graph_bytes(variant="graph_wasm")


def test_int8_wasm_graph_is_model_onnx_in_pieces(tmp_path, tiny_hf, monkeypatch):
    """An int8 bundle's wasm graph is model.onnx with its int8 tables read in pieces of columns (the embedding's,
    and the layers' from 4M weights, here all of them) and model.onnx's float32 KV cache: the same logits bit for
    bit, with one session and with staged ones, so the page's answers are `run`'s."""
    import converter.bundle as bundle_mod
    from converter.bundle import BuildOptions, write_bundle
    monkeypatch.setattr(bundle_mod, "LAYER_PIECE_MIN_WEIGHTS", 0)
    write_bundle(open_checkpoint(tiny_hf[0]), tmp_path / "b", BuildOptions(scheme="int8", chunk_symbols=4096))
    bundle = load(tmp_path / "b")
    pieces = bundle.manifest["graph_wasm"]["pieces"]
    linears = [e["name"] for e in bundle.initializers if e["name"].endswith(".q")]
    assert set(pieces) == set(linears) and len(linears) == 1 + 7 * bundle.config.num_hidden_layers
    model = onnx.load_from_string(bundle.graph_bytes(variant="graph_wasm"))
    kv = [v for v in list(model.graph.input) + list(model.graph.output) if "key" in v.name or "value" in v.name]
    assert {v.type.tensor_type.elem_type for v in kv} == {onnx.TensorProto.FLOAT}
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in model.graph.node) == len(linears)
    want = OrtDecoder(bundle).forward_full(IDS)
    np.testing.assert_array_equal(OrtDecoder(bundle, variant="graph_wasm").forward_full(IDS), want)
    np.testing.assert_array_equal(OrtDecoder(bundle, variant="graph_wasm", low_memory=True).forward_full(IDS), want)


@pytest.mark.parametrize("scheme", ["f32", "int8", "int4-g32", "int4-m32"])
def test_session_weight_bytes_is_what_onnxruntime_holds(tiny_bundles, tmp_path, monkeypatch, scheme):
    """ort_session.session_weight_bytes (what the memory targets divide by) equals the initializers of the graph
    onnxruntime optimized at session creation (its optimized_model_filepath): int4-gG's and int8's float16 scales
    folded into float32, int4-mG's loader-made block scales; only the graph's own small constants differ."""
    import onnxruntime as ort

    from converter.ort_session import create_session, session_weight_bytes

    out = tmp_path / "optimized.onnx"

    class Options(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.optimized_model_filepath = str(out)

    monkeypatch.setattr(ort, "SessionOptions", Options)
    bundle = load(tiny_bundles(scheme))
    create_session(bundle)
    held = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(out)).graph.initializer)
    ours, stored = session_weight_bytes(bundle), bundle.manifest["totals"]["runtime_bytes"]
    assert abs(held - ours) <= 0.005 * held, (held, ours, stored)
    if scheme != "f32":
        assert ours > stored           # the float16 scales are float32 in the session


def _append_twin(bundle, float16_kv: bool = False, append: bool = True):
    """The bundle (a float32 one) with model.onnx exported in the wasm graph's cache form instead
    (onnx_export.attention_append: the cache position-major, only the new positions out; append=False: the Concat
    form, with float16_kv its float16 cache)."""
    from converter.onnx_export import export_model
    model = export_model(bundle.config, graph_initializers(bundle.manifest), bundle.manifest["scheme"],
                         bundle.manifest["embed_scheme"], kv_float16=float16_kv, append_kv=append)
    check_graph(model)
    raw = model.SerializeToString()
    twin = load(bundle.path)
    twin.graph_bytes = lambda float16=False, variant="graph": raw
    return twin


def test_appended_cache_graph_equals_the_concat_graph(tiny_bundles):
    """The wasm graph's attention (the past fed position-major, the present only the new positions, which the
    caller appends) computes what model.onnx's Concat form does, on a float model where no activation is
    re-quantized: prefill, decode steps, a rewind, and a left-padded batch, to float rounding."""
    bundle = load(tiny_bundles("f32"))
    twin = _append_twin(bundle)
    model = onnx.load_from_string(twin.graph_bytes())
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    present = next(o for o in model.graph.output if o.name == "present.0.key")
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    c = bundle.config
    assert dims(past) == ["batch", "past_seq", c.num_key_value_heads, c.head_dim]
    assert dims(present) == ["batch", "seq", c.num_key_value_heads, c.head_dim]
    assert not any(n.op_type == "Concat" and n.output[0].startswith("present") for n in model.graph.node)
    a, b = OrtDecoder(bundle), OrtDecoder(twin)
    assert (a.kv_append, b.kv_append) == (False, True)
    np.testing.assert_allclose(b.run(np.array([IDS[:6]])), a.run(np.array([IDS[:6]])), rtol=0, atol=1e-5)
    for t in IDS[6:]:                                       # decode: one position at a time after the cache
        np.testing.assert_allclose(b.run(np.array([[t]])), a.run(np.array([[t]])), rtol=0, atol=1e-5)
    assert b.past["past_key_values.0.key"].shape == (1, len(IDS), c.num_key_value_heads, c.head_dim)
    a.rewind(4), b.rewind(4)
    np.testing.assert_allclose(b.run(np.array([IDS[7:9]])), a.run(np.array([IDS[7:9]])), rtol=0, atol=1e-5)
    a.reset(2), b.reset(2)                                  # evaluation's batches: left padding, then a step
    ids, mask = np.array([[0, 0] + IDS[:4], IDS[:6]]), np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    np.testing.assert_allclose(b.run(ids, mask), a.run(ids, mask), rtol=0, atol=1e-5)
    np.testing.assert_allclose(b.run(np.array([[5], [6]])), a.run(np.array([[5], [6]])), rtol=0, atol=1e-5)


def test_appended_float16_cache_attends_to_what_it_stores(tiny_bundles):
    """With a float16 cache (the group schemes' wasm graph) the new positions come out rounded to float16 and the
    run attends to them rounded, as the next run reads them back, as the Concat graph's float16 form does: the same
    logits to float rounding, a position at a time and as one prompt; staged sessions give the one session's
    logits bit for bit."""
    bundle = load(tiny_bundles("f32"))
    twin, concat = _append_twin(bundle, float16_kv=True), _append_twin(bundle, float16_kv=True, append=False)
    steps, want = OrtDecoder(twin), OrtDecoder(concat)
    assert steps.kv_dtype == want.kv_dtype == np.float16 and steps.kv_append and not want.kv_append
    got = np.concatenate([steps.run(np.array([[t]])) for t in IDS], axis=1)[0]
    np.testing.assert_allclose(got, np.concatenate([want.run(np.array([[t]])) for t in IDS], axis=1)[0],
                               rtol=0, atol=1e-5)
    whole = OrtDecoder(concat).forward_full(IDS)
    np.testing.assert_allclose(OrtDecoder(twin).forward_full(IDS), whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-4)     # float16 rounding: a prompt vs its steps
    staged = OrtDecoder(twin, low_memory=True)
    np.testing.assert_array_equal(np.concatenate([staged.run(np.array([[t]])) for t in IDS], axis=1)[0], got)
    assert staged.past["past_key_values.1.value"].dtype == np.float16
