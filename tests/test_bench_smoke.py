"""`python -m bench --quick` on the tiny random model: every section of the JSON is there and holds numbers,
the same prompt gave the same greedy tokens on onnxruntime CPU and in the page, and the figures were written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("page_start_ms", "download_ms", "decode_after_download_ms", "verify_rest_ms", "session_ms",
          "python_wait_ms", "first_token_ms", "ttft_ms")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from bench.browser import skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "bench-quick.json").read_text()), proc.stdout


def test_every_configuration_ran(quick):
    _, doc, _ = quick
    s = doc["summary"]
    assert s["errors"] == {}
    assert {"ortcpu/int8/t1", "page-wasm/int8/t1", "wllama/wasm/t1", "load/int8-packed"} <= set(s["configs"])
    assert doc["meta"]["llama_cpp_python"]           # "included", or why it was skipped


def test_token_speed(quick):
    _, doc, _ = quick
    cfg = doc["summary"]["configs"]
    for key in ("ortcpu/int8/t1", "page-wasm/int8/t1", "wllama/wasm/t1"):
        m = cfg[key]
        assert m["prefill_tok_s"]["median"] > 0 and m["decode_tok_s"]["median"] > 0, key
        assert m["new_tokens"]["median"] == doc["meta"]["new_tokens"], key
    # one prompt for all: the same token count everywhere
    counts = {cfg[k]["prompt_tokens"]["median"] for k in ("ortcpu/int8/t1", "page-wasm/int8/t1", "wllama/wasm/t1")}
    assert len(counts) == 1, counts
    # the next reply of the same load and the first of a return visit, timed too (the page's first reply after a
    # load pays for V8's optimizing compiles; the code cache in the profile spares a return visit that)
    for key in ("page-wasm/int8/t1", "wllama/wasm/t1"):
        assert cfg[key]["decode_again_tok_s"]["median"] > 0, key
        assert cfg[key]["decode_return_tok_s"]["median"] > 0, key
    for metric in ("decode_again_tok_s", "decode_return_tok_s"):
        assert any(r["metric"] == metric for r in doc["summary"]["targets"]["vs_wllama"]), metric
    assert cfg["page-wasm/int8/t1"]["ep"] == "wasm"
    per = cfg["page-wasm/int8/t1"]["per_token_ms"]
    assert set(per) == {"run", "feeds", "kv", "logits", "topk", "python", "yield"}
    assert per["run"]["median"] > 0


def test_page_and_ort_cpu_agree(quick, tmp_path):
    """The page ran the bundle's wasm graph and onnxruntime CPU model.onnx: each gave the greedy tokens of the
    reference path on its own graph (the same tiny bundle, rebuilt here as bench/prepare.py builds it). Since
    session 23 int8's two graphs may part after the prompt (the wasm graph's cache is appended, so its decode steps
    sum in another order, and int8 re-quantizes activations per token): their first tokens agree."""
    from bench import prepare
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig, generate

    _, doc, _ = quick
    runs = {r["key"]: r["result"] for r in doc["runs"]}
    page, cpu = runs["page-wasm/int8/t1"]["generate"]["tokens"], runs["ortcpu/int8/t1"]["tokens"]
    bundle = prepare.prepare_tiny(tmp_path, ["int8"], log=lambda *_: None).bundles["tiny-int8"]
    for graph, got in (("wasm", page), ("model", cpu)):
        chat = open_chat_model(str(bundle), graph=graph)
        want = generate(chat.session, chat.tokenizer, chat.prompt_ids(raw=doc["meta"]["prompt"]), eos_ids=[],
                        cfg=SamplingConfig(max_new_tokens=doc["meta"]["new_tokens"])).token_ids
        assert got == want, graph
    assert page[:2] == cpu[:2]
    # the return visit (the wasm module from V8's code cache) gave the same tokens as the first visit
    assert runs["page-wasm/int8/t1"]["warm_generate"]["tokens"] == page


def test_load_stages(quick):
    _, doc, _ = quick
    cfg = doc["summary"]["configs"]
    for key, phases in (("page-wasm/int8/t1", ("cold", "warm")), ("load/int8-packed", ("cold",))):
        for phase in phases:
            st = {k: cfg[key][phase][k]["median"] for k in STAGES}
            assert all(v >= 0 for v in st.values()), (key, phase, st)
            assert st["ttft_ms"] >= st["session_ms"] + st["first_token_ms"] > 0, (key, phase, st)


def test_memory(quick):
    _, doc, _ = quick
    cfg = doc["summary"]["configs"]
    mem = cfg["page-wasm/int8/t1"]["memory"]
    assert mem["peak_pss_mib"]["median"] > mem["idle_pss_mib"]["median"] > 0
    assert mem["ua_memory_mib"]["median"] > 0               # crossOriginIsolated: the UA memory API answered
    assert mem["pyodide_heap_mib"]["median"] > 0
    # the page's memory: the API's total plus Pyodide's heap, which the API does not count
    assert mem["page_memory_mib"]["median"] > mem["ua_memory_mib"]["median"]
    page = next(r for r in doc["summary"]["targets"]["memory"] if r["config"] == "page-wasm/int8/t1")
    assert page["page_memory_ratio"] > page["ua_memory_ratio"] > 0
    assert cfg["ortcpu/int8/t1"]["peak_rss_mib"]["median"] > 0
    run = next(r for r in doc["runs"] if r["key"] == "page-wasm/int8/t1")
    timeline = run["result"]["memory"]["timeline"]
    assert len(timeline) > 5 and {"t", "total", "renderer", "gpu", "browser"} <= set(timeline[0])


def test_targets_have_ratios(quick):
    _, doc, stdout = quick
    tg = doc["summary"]["targets"]
    for section in ("wasm_vs_ortcpu", "vs_wllama", "lzw_ttft", "memory"):
        assert tg[section], section
    assert all(r["ratio"] > 0 for r in tg["wasm_vs_ortcpu"] + tg["vs_wllama"])
    assert next(r for r in tg["lzw_ttft"] if r["phase"] == "cold")["added"] is not None
    assert "Targets" in stdout and "Token speed" in stdout


def test_figures(quick):
    out, _, _ = quick
    for name in ("speed", "load", "memory", "profile", "warmup"):
        png = out / f"quick-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
