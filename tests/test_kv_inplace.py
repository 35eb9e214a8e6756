"""The in-place KV cache (converter/kv_inplace.py): model.onnx rewritten around GroupQueryAttention, its cache one
buffer per tensor that onnxruntime writes in place, must give the logits of the bundle's own graph."""
import numpy as np
import onnx
import pytest

from converter.bundle import load
from converter.cli import _kv, configure_parser, main
from converter.errors import TinyQMoEError
from converter.kv_inplace import SEQLENS, TOTAL, InplaceCache, inplace_kv_graph
from converter.onnx_export import check_graph
from converter.ort_session import OrtDecoder

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 12, 13]


def _close(a, b, tol=1e-4):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def _steps(dec, ids, steps):
    """Prefill, then greedy steps: every position's logits of the prefill and each step's last logits."""
    out = [dec.run(np.asarray([ids], np.int64))[0]]
    tok = int(out[0][-1].argmax())
    for _ in range(steps):
        out.append(dec.run(np.asarray([[tok]], np.int64))[0])
        tok = int(out[-1][-1].argmax())
    return out


@pytest.mark.parametrize("scheme", ["f32", "int4-g32", "q4_1"])
def test_inplace_cache_gives_the_graphs_logits(tiny_bundles, scheme, monkeypatch):
    """Prefill + 40 decode steps, the capacity doubling on the way (first capacity 8): every logit within 1e-4 of
    the bundle's graph with its Concat cache, and the buffers are the same arrays before and after a step that
    does not grow them (written in place, not replaced)."""
    monkeypatch.setattr(InplaceCache, "FIRST", 8)
    bundle = load(tiny_bundles(scheme))
    ref, dec = OrtDecoder(bundle), OrtDecoder(bundle, kv="inplace")
    want, got = _steps(ref, PROMPT, 40), _steps(dec, PROMPT, 40)
    for w, g in zip(want, got):
        _close(g, w)
    assert dec.cached == ref.cached == len(PROMPT) + 40
    assert dec.inplace.capacity == 64
    before = {k: id(v) for k, v in dec.inplace.bufs.items()}
    k0 = dec.inplace.bufs["past_key_values.0.key"][:, :, :dec.cached].copy()
    dec.run(np.asarray([[1]], np.int64))
    assert {k: id(v) for k, v in dec.inplace.bufs.items()} == before
    np.testing.assert_array_equal(dec.inplace.bufs["past_key_values.0.key"][:, :, :k0.shape[2]], k0)


def test_inplace_cache_in_the_memory_modes(tiny_bundles):
    """The staged sessions (--low-memory, --strict-memory) bind their layers' caches in place too: the same logits
    as the one in-place session, bit for bit (the same kernels), and as the Concat graph to 1e-4."""
    bundle = load(tiny_bundles("int8"))
    one = _steps(OrtDecoder(bundle, kv="inplace"), PROMPT, 12)
    ref = _steps(OrtDecoder(bundle), PROMPT, 12)
    for mode in (True, "strict"):
        staged = _steps(OrtDecoder(bundle, kv="inplace", low_memory=mode), PROMPT, 12)
        for a, b in zip(staged, one):
            np.testing.assert_array_equal(a, b)
    # int8 rounds the activations per token: a last-bit difference in the attention can move a rounding, so the
    # tiny model's int8 logits are compared with a looser tolerance than the float schemes'
    for a, b in zip(one, ref):
        _close(a, b, 2e-2)


def test_rewind_and_reset(tiny_bundles):
    """Rewinding keeps the first n positions (the chat runtime reuses a prompt's common prefix): the next logits are
    those of a fresh run over the same ids."""
    bundle = load(tiny_bundles("f32"))
    dec = OrtDecoder(bundle, kv="inplace")
    dec.run(np.asarray([PROMPT], np.int64))
    dec.rewind(5)
    assert dec.cached == 5 and dec.tokens == PROMPT[:5]
    got = dec.run(np.asarray([[77, 78]], np.int64))[0]
    fresh = OrtDecoder(bundle, kv="inplace")
    want = fresh.run(np.asarray([PROMPT[:5] + [77, 78]], np.int64))[0][-2:]
    _close(got, want)
    with pytest.raises(ValueError):
        dec.rewind(dec.cached + 1)
    dec.reset()
    assert dec.cached == 0 and dec.tokens == []


def test_what_the_inplace_cache_refuses(tiny_bundles):
    bundle = load(tiny_bundles("f32"))
    dec = OrtDecoder(bundle, kv="inplace")
    with pytest.raises(TinyQMoEError, match="batch 1"):
        dec.run(np.asarray([PROMPT, PROMPT], np.int64))
    with pytest.raises(TinyQMoEError, match="without padding"):
        dec.run(np.asarray([PROMPT], np.int64), mask_new=np.asarray([[0] + [1] * (len(PROMPT) - 1)]))
    with pytest.raises(TinyQMoEError, match="batch 1"):
        dec.reset(batch=2)
    with pytest.raises(TinyQMoEError, match="model.onnx"):
        OrtDecoder(bundle, kv="inplace", float16=True)
    with pytest.raises(TinyQMoEError, match="model.onnx"):
        OrtDecoder(load(tiny_bundles("int4-g32")), kv="inplace", variant="graph_wasm")
    with pytest.raises(TinyQMoEError, match="kv"):
        OrtDecoder(bundle, kv="ring")


def test_the_rewritten_graph(tiny_bundles):
    """One GroupQueryAttention per layer, no Concat left on the cache, no attention mask; the cache's sequence
    axis is the capacity; onnx.checker accepts it (full check). A graph that is not this exporter's is refused by name."""
    bundle = load(tiny_bundles("int8"))
    model = inplace_kv_graph(onnx.load_from_string(bundle.graph_bytes()), bundle.config)
    check_graph(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == bundle.config.num_hidden_layers
    assert not any(n.op_type == "Concat" and any(o.startswith("present.") for o in n.output) for n in model.graph.node)
    inputs = {i.name for i in model.graph.input}
    assert "attention_mask" not in inputs and {SEQLENS, TOTAL} <= inputs
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[2].dim_param == "kv_capacity"
    broken = onnx.load_from_string(bundle.graph_bytes())
    keep = [n for n in broken.graph.node if n.name != "/model/layers.1/attn/ctx/Merge"]
    del broken.graph.node[:]
    broken.graph.node.extend(keep)
    with pytest.raises(TinyQMoEError, match="/model/layers.1/attn/ctx/Merge"):
        inplace_kv_graph(broken, bundle.config)


def test_cli_runs_inplace_where_it_can(tiny_bundles, capsys, monkeypatch):
    """run/chat default to the in-place cache on model.onnx (one session and the memory modes) and to the bundle's
    own graph elsewhere; --kv says it outright; the text is the Concat graph's (greedy, f32 tiny model)."""
    path = str(tiny_bundles("f32"))

    def decided(*extra):
        return _kv(configure_parser().parse_args(["run", path, "--prompt", "x", *extra]))

    assert [decided(), decided("--low-memory"), decided("--strict-memory")] == ["inplace"] * 3
    assert [decided("--fp16"), decided("--graph", "wasm"), decided("--graph", "fp16")] == ["concat"] * 3
    assert decided("--kv", "concat") == "concat" and decided("--kv", "inplace", "--low-memory") == "inplace"
    made = []
    init = OrtDecoder.__init__
    monkeypatch.setattr(OrtDecoder, "__init__", lambda self, *a, **k: (made.append(k.get("kv")), init(self, *a, **k))[1])
    texts = []
    for extra in ([], ["--kv", "concat"], ["--strict-memory"]):
        assert main(["run", path, "--prompt", "hello there", "--max-new-tokens", "12", *extra]) == 0
        texts.append(capsys.readouterr().out.splitlines()[0])
    assert made == ["inplace", "concat", "inplace"]
    assert texts[0] == texts[1] == texts[2]


def test_cli_falls_back_where_the_graph_cannot_be_rewritten(tiny_bundles, capsys, monkeypatch):
    """A bundle whose graph the rewrite does not know (an older exporter's) still runs under the default --kv auto:
    the bundle's own graph, with a note; --kv inplace asked outright fails with the rewrite's one-line error."""
    import converter.kv_inplace as K

    def refuse(model, cfg):
        raise TinyQMoEError(f"{K.REFUSAL}: the graph has no node /model/layers.0/attn/q/Reshape (test)")

    monkeypatch.setattr(K, "inplace_kv_graph", refuse)
    path = str(tiny_bundles("f32"))
    assert main(["run", path, "--prompt", "hello there", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "running the bundle's own graph (--kv concat)" in out.err
    assert main(["run", path, "--prompt", "hello there", "--max-new-tokens", "6", "--kv", "inplace"]) == 2
    assert "in-place KV cache: the graph has no node" in capsys.readouterr().err
