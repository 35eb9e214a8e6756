"""Low-memory mode (converter/ort_stages.py): the graph as one onnxruntime session per stage of layers gives the
logits of the single session, reads none of the weights it was handed once they are packed, and is reachable from
the CLI."""
import numpy as np
import onnx
import pytest

import tiny
from converter.bundle import BuildOptions, load, write_bundle
from converter.cli import main
from converter.errors import TinyQMoEError
from converter.loaders import open_checkpoint
from converter import ort_stages
from converter.ort_session import OrtDecoder
from converter.ort_stages import layers_per_stage, plan_stages

IDS = [5, 17, 42, 99, 3, 250, 7, 7, 300, 11]


@pytest.fixture(autouse=True)
def one_layer_per_stage(monkeypatch):
    """The tiny model's layers are a few KB, so by bytes they would all share one stage: split them one by one."""
    monkeypatch.setattr(ort_stages, "STAGE_BYTES", 1)


def test_layers_per_stage_follows_the_weight_bytes(tiny_bundles, monkeypatch):
    bundle = load(tiny_bundles("int8"))
    layer0 = sum(e["nbytes"] for e in bundle.initializers if e["name"].startswith("model.layers.0."))
    assert layers_per_stage(bundle) == 1
    monkeypatch.setattr(ort_stages, "STAGE_BYTES", 3 * layer0)
    assert layers_per_stage(bundle) == 3
    staged = OrtDecoder(bundle, low_memory=True)
    assert len(staged.session.sessions) == 2 + -(-bundle.config.num_hidden_layers // 3)
    monkeypatch.setattr(ort_stages, "STAGE_BYTES", 2 * layer0)      # --strict-memory in place: half the bytes
    assert (layers_per_stage(bundle), layers_per_stage(bundle, half=True)) == (2, 1)
    assert bundle.config.num_hidden_layers == 2
    assert len(OrtDecoder(bundle, low_memory="strict", kv="inplace").session.sessions) == 2 + 2
    assert len(OrtDecoder(bundle, low_memory="strict").session.sessions) == 2 + 1
    np.testing.assert_array_equal(staged.forward_full(IDS), OrtDecoder(bundle).forward_full(IDS))


@pytest.mark.parametrize("scheme,embed,variant", [("f32", None, "graph"), ("int8", None, "graph"),
                                                  ("int4-g32", None, "graph"), ("int4-g32", "int8-g32", "graph_wasm"),
                                                  ("ternary", None, "graph"), ("ternary-g64", None, "graph"),
                                                  ("int2-g64", None, "graph"), ("int4-m32", None, "graph"),
                                                  ("int4-m32", None, "graph_wasm")])
def test_staged_logits_equal_the_single_session(tiny_bundles, scheme, embed, variant):
    bundle = load(tiny_bundles(scheme, embed))
    want = OrtDecoder(bundle, variant=variant).forward_full(IDS)
    staged = OrtDecoder(bundle, variant=variant, low_memory=True)
    assert len(staged.session.sessions) == bundle.config.num_hidden_layers + 2
    np.testing.assert_array_equal(staged.forward_full(IDS), want)


@pytest.mark.parametrize("scheme,embed,variant", [("f32", None, "graph"), ("int8", None, "graph"),
                                                  ("int4-g32", "int8-g32", "graph_wasm"),
                                                  ("ternary-g64", None, "graph"), ("int4-m64", None, "graph_wasm")])
def test_strict_logits_equal_the_single_session(tiny_bundles, scheme, embed, variant):
    bundle = load(tiny_bundles(scheme, embed))
    want = OrtDecoder(bundle, variant=variant).forward_full(IDS)
    np.testing.assert_array_equal(OrtDecoder(bundle, variant=variant, low_memory="strict").forward_full(IDS), want)


@pytest.mark.parametrize("mode", [True, "strict"])
def test_strict_lm_head_reads_the_one_embedding(tiny_bundles, mode):
    """strict: the lm_head multiplies by the very buffer the embedding's Gather reads (no packed copy of its own), so
    changing that buffer changes the head's output; without strict the head runs on onnxruntime's packed copy."""
    bundle = load(tiny_bundles("int8"))
    staged = OrtDecoder(bundle, low_memory=mode).session
    head = staged.sessions[-1]
    feeds = {i.name: np.random.default_rng(0).standard_normal([1, 3, bundle.config.hidden_size]).astype(np.float32)
             if i.name != "num_logits_to_keep" else np.array(0, np.int64) for i in head.get_inputs()}
    before = head.run(None, feeds)[0]
    staged.borrowed["model.embed_tokens.weight.q"][:] //= 2
    after = head.run(None, feeds)[0]
    if mode == "strict":
        assert not np.allclose(after, before)
    else:
        np.testing.assert_array_equal(after, before)


def test_low_memory_mode_is_checked(tiny_bundles):
    with pytest.raises(TinyQMoEError, match="low_memory"):
        OrtDecoder(load(tiny_bundles("int8")), low_memory="tight")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_long_generation_memory_stays_flat(tiny_bundles):
    """The KV tensors grow by one position at every step; the shared arena must reuse its memory for them. Grown by
    exactly each failing request, it piled up regions quadratically: +160 MiB over these 470 steps on the tiny
    model, whose whole KV cache ends at 0.5 MB (SmolLM2 int8: +3.1 GiB over 512 steps)."""
    dec = OrtDecoder(load(tiny_bundles("int8")), low_memory=True)
    dec.reset()
    dec.run(np.asarray([IDS[:4]]), last_only=True)
    for t in range(30):
        dec.run(np.asarray([[t + 1]]), last_only=True)
    before = _rss_mib()
    for t in range(470):
        dec.run(np.asarray([[t % 300 + 1]]), last_only=True)
    assert dec.cached == 504
    assert _rss_mib() - before < 16


def test_staged_cached_decode_equals_the_single_session(tiny_bundles):
    bundle = load(tiny_bundles("int4-g32"))
    one, staged = OrtDecoder(bundle), OrtDecoder(bundle, low_memory=True)
    for dec in (one, staged):
        dec.reset()
    outs = []
    for dec in (one, staged):
        steps = [dec.run(np.asarray([IDS[:4]]))[0, -1]]
        steps += [dec.run(np.asarray([[t]]))[0, -1] for t in IDS[4:]]
        outs.append(np.stack(steps))
    np.testing.assert_array_equal(outs[1], outs[0])
    for name in one.past:
        np.testing.assert_array_equal(staged.past[name], one.past[name])


def test_weights_handed_over_are_not_read_after_creation(tiny_bundles):
    """onnxruntime must own what it reads: the decoded arrays given to each layer's session are freed once it
    exists. Filling the freed memory with junk (the heap hands it out again) must not change the logits."""
    bundle = load(tiny_bundles("int8"))
    want = OrtDecoder(bundle).forward_full(IDS)
    staged = OrtDecoder(bundle, low_memory=True)
    assert set(staged.session.borrowed) == {"model.embed_tokens.weight.q", "model.embed_tokens.weight.scales",
                                            "model.norm.weight"}   # tied: the embedding's stages borrow theirs
    junk = [np.full(n, 0x7F, np.uint8) for n in [1 << 16] * 64 + [4096] * 512 + [300] * 2048]
    np.testing.assert_array_equal(staged.forward_full(IDS), want)
    del junk


def test_untied_head_gets_its_own_stage_weights(tmp_path):
    """Untied: no initializer is read by two stages, so every stage gets copies and none is kept."""
    tiny.write_hf(tmp_path / "hf", tied=False, dtype="f32")
    write_bundle(open_checkpoint(tmp_path / "hf"), tmp_path / "b", BuildOptions(scheme="int8", chunk_symbols=4096))
    bundle = load(tmp_path / "b")
    staged = OrtDecoder(bundle, low_memory=True)
    np.testing.assert_array_equal(staged.forward_full(IDS), OrtDecoder(bundle).forward_full(IDS))
    assert staged.session.borrowed == {}


def test_plan_covers_every_node_once_in_order(tiny_bundles):
    bundle = load(tiny_bundles("int4-g32"))
    graph = onnx.load_from_string(bundle.graph_bytes()).graph
    stages = plan_stages(graph)
    L = bundle.config.num_hidden_layers
    assert len(stages) == L + 2
    const = {t.name for t in graph.initializer}
    produced_before = {x.name for x in graph.input} | const | {""}
    owner = {}
    for k, st in enumerate(stages):
        made = set()
        for i in st.nodes:
            n = graph.node[i]
            assert all(x in produced_before or x in made for x in n.input), (k, n.name)
            made.update(n.output)
            if not all(x in const for x in n.input):
                owner.setdefault(i, k)
        assert set(st.inputs) <= produced_before, k
        produced_before |= set(st.outputs)
    computed = [i for i, n in enumerate(graph.node) if i in owner]
    assert sorted(owner) == computed and len(owner) == len({i for st in stages for i in st.nodes} & set(owner))
    names = [graph.node[i].name for i in stages[1].nodes if i in owner]
    assert names and all(n.startswith(("/model/layers.0/", "/quantize/layers.0/")) for n in names)
    assert "logits" in stages[-1].outputs and "present.0.key" in stages[1].outputs


def test_float16_graph_is_refused(tiny_bundles):
    with pytest.raises(TinyQMoEError, match="float32 graphs only"):
        OrtDecoder(load(tiny_bundles("f32")), float16=True, low_memory=True)


def test_cli_run_low_and_strict_memory_say_the_same(tiny_bundles, capsys):
    path = str(tiny_bundles("int8"))
    texts = []
    for extra in ([], ["--low-memory"], ["--strict-memory"]):
        assert main(["run", path, "--prompt", "hello there", "--max-new-tokens", "8", *extra]) == 0
        texts.append(capsys.readouterr().out.splitlines()[0])
    assert texts[0] == texts[1] == texts[2]


def test_cli_int8_compute_runs_with_every_memory_mode(tiny_bundles, capsys):
    """run --int8-compute, alone and with the staged modes: the staged sessions run the same int8 kernels, so the
    same text."""
    path = str(tiny_bundles("int4-g32"))
    texts = []
    for extra in ([], ["--low-memory"], ["--strict-memory"]):
        assert main(["run", path, "--prompt", "hello there", "--max-new-tokens", "8", "--int8-compute", *extra]) == 0
        texts.append(capsys.readouterr().out.splitlines()[0])
    assert texts[0] == texts[1] == texts[2]


def test_cli_multiplies_in_int8_by_default_on_one_float32_session(tiny_bundles, capsys, monkeypatch):
    """run/chat default to int8 compute with one session on model.onnx (the fast path a user wants), and to float
    compute in the memory modes and on the other graphs; --int8-compute / --float-compute say it outright. The
    default's text is --int8-compute's."""
    from converter.cli import _int8_compute, configure_parser

    path = str(tiny_bundles("int4-g32"))

    def decided(*extra):
        return _int8_compute(configure_parser().parse_args(["run", path, "--prompt", "x", *extra]))

    assert decided() is True
    assert [decided(x) for x in ("--low-memory", "--strict-memory", "--fp16")] == [False, False, False]
    assert [decided("--graph", g) for g in ("wasm", "fp16")] == [False, False]
    assert decided("--float-compute") is False and decided("--int8-compute", "--low-memory") is True
    with pytest.raises(SystemExit):
        configure_parser().parse_args(["run", path, "--prompt", "x", "--int8-compute", "--float-compute"])
    capsys.readouterr()
    made = []
    init = OrtDecoder.__init__
    monkeypatch.setattr(OrtDecoder, "__init__", lambda self, *a, **k: (made.append(k.get("int8_compute")),
                                                                      init(self, *a, **k))[1])
    texts = []
    for extra in ([], ["--int8-compute"], ["--float-compute"], ["--low-memory"]):
        assert main(["run", path, "--prompt", "hello there", "--max-new-tokens", "8", *extra]) == 0
        texts.append(capsys.readouterr().out.splitlines()[0])
    assert made == [True, True, False, False]
    assert texts[0] == texts[1]
