// The page: wires the bundle list, the loading pipeline, the session and the Pyodide runtime to the chat UI.
// Test hook: window.tinyqmoe = {ready, load(name, ep), generate(prompt or messages, opts), warmedUp(), ...} (used by
// e2e/ and bench/).
// URL parameters: bundle, ep, autoload, workers (decoder pool size), threads (onnxruntime-web wasm threads),
// kv (cpu: WebGPU KV cache round-trips through the CPU), yield (frame: wait for a frame between tokens) — the last
// two bring back the behaviour before the bench's fixes, for A/B runs; so does into=0: decoded chunks come back to
// the page, which copies them into place, instead of the workers building whole tensors), graph (auto | fp16 | fp32 | wasm: which graph
// runs; auto = model.fp16.onnx on a WebGPU adapter with shader-f16, model.wasm.onnx on the WASM EP when the bundle has
// one (group schemes), else model.onnx), heap (bytes the WASM EP's heap is grown by before the weights are copied
// in, default heapReserve's; 0: none, and the heap grows by Emscripten's own 20 % steps — the behaviour before),
// heapgrowth (5: past the reservation, 5 % steps as before session 27 instead of what an allocation asks for),
// warmup (0: no throwaway decode steps after a load on the WASM EP; warmUp below).
import { DecoderPool } from "./qz.js";
import { loadBundle } from "./loader.js";
import { chooseProvider, DecoderSession, heapReserve, prefillRows, TOP_CANDIDATES, webgpuDevice } from "./ort-session.js";
import { PyRuntime } from "./py-runtime.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = { session: null, manifest: null, history: [], stopRequested: false, busy: false, loadTimings: null };
const threads = Number(params.get("threads")) || 0;   // 0: the default of ort-session.js (1 thread on ≤ 2 cores)
// kvOnDevice: WebGPU only, ?kv=cpu for the old behaviour; build: which onnxruntime-web build runs the WASM EP,
// ?ort=webgpu for the JSEP build the WebGPU EP needs (the old behaviour), default the plain wasm build
const sessionOpts = { kvOnDevice: params.get("kv") !== "cpu", build: params.get("ort") || "auto" };
// lookahead (converter/runtime/generate.py): draft tokens a step checks in the same run. The chat uses the
// Sampling box's value (3 unless ?lookahead=N) where dropping the cache of an unconfirmed draft costs nothing (the
// wasm graph's appended cache: only its length changes), none elsewhere; the test hook takes ?lookahead=N or its
// own option, 0 by default (README "Speed and memory").
const lookaheadParam = params.get("lookahead");
if (lookaheadParam !== null) $("lookahead").value = String(Number(lookaheadParam) || 0);
const lookaheadFor = (session) => (session.append ? Math.max(0, Math.floor(Number($("lookahead").value) || 0)) : 0);
const workers = () => Number(params.get("workers")) || navigator.hardwareConcurrency || 2;
// Pyodide starts while the user picks and downloads a bundle, on this thread; ?py=worker runs it in a worker
// (measured on this 2-core machine: no faster to ready cold, slower warm — Pyodide's start then competes with the
// decoder pool and onnxruntime-web for the same two cores; README "Changes landed")
const pyReady = PyRuntime.start(params.get("py") === "worker" ? "worker" : "main",
                                params.get("pyheap") === "20" ? "20%" : "5%");   // Pyodide's heap steps (A/B)
pyReady.catch((e) => showError(`Python runtime failed to start: ${e.message}`));

function showError(msg) { $("error").textContent = msg; $("error").hidden = false; }

/** An error as the user reads it. onnxruntime-web reports a full wasm heap as "std::bad_alloc" (and a failed
 * allocation of a large buffer is a RangeError): measured with a Llama-3.2-3B-shaped int4 bundle, whose 3.7 GiB
 * of weights left too little of wasm32's 4 GiB for a 120-token prompt in one run. Say what it means. */
function explain(e, when, manifest) {
  const msg = e.message || String(e);
  if (!/bad_alloc|out of memory|Memory\.grow|Maximum memory size|Array buffer allocation failed/i.test(msg)) return `${when}: ${msg}`;
  const weights = manifest ? ` (this model's weights: ${mb(manifest.totals.runtime_bytes)})` : "";
  return `${when}: out of memory — ${msg}. On the WASM EP the whole model lives in onnxruntime-web's heap, which ` +
    `cannot grow past 4 GiB${weights}. A shorter message may still fit; a smaller model or scheme will (on the WASM ` +
    `EP int8 and int4-m32 need less memory than int4-g32, whose codes are held one per byte there with per-group ` +
    `tables beside them).`;
}
function notice(msg) { $("notice").textContent = msg; $("notice").hidden = false; }
function stage(name, ms) {
  const li = document.createElement("li");
  li.textContent = `${name}: ${(ms / 1000).toFixed(2)} s`;
  li.dataset.stage = name;
  $("stages").appendChild(li);
}
const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;

async function listBundles() {
  const res = await fetch("/api/bundles");
  const list = await res.json();
  const sel = $("bundle-select");
  sel.innerHTML = "";
  for (const b of list) {
    const o = document.createElement("option");
    o.value = b.name;
    o.textContent = `${b.name} — ${b.scheme}, ${mb(b.bytes)}, ${b.bits_per_weight.toFixed(2)} bits/weight`;
    sel.appendChild(o);
  }
  return list;
}

/** Positions per onnxruntime run: ?prefill=N, else what keeps the graph's prefill activations small for weights
 * of this size (prefillRows). */
const maxRows = (manifest, variant, weightBytes, ep) =>
  Number(params.get("prefill")) || prefillRows(manifest, variant, weightBytes, ep);

/** Session options that depend on the bundle: positions per run and, on the WASM EP, the heap the session is
 * given before its weights are copied in (heapReserve; ?heap=N bytes; ?heap=0: none) and how it grows past that
 * (ort-heap.mjs: by what is asked for; ?heapgrowth=5: by Emscripten's 5 % steps, as before session 27). */
function bundleOpts(manifest, variant, weightBytes, ep) {
  const rows = maxRows(manifest, variant, weightBytes, ep);
  const asked = params.get("heap");
  const heapBytes = ep !== "wasm" || asked === "0" ? 0
    : Number(asked) || heapReserve(weightBytes, manifest, variant, rows);
  return { maxRows: rows, heapBytes, heapGrowth: params.get("heapgrowth") === "5" ? "5%" : "exact" };
}

const GRAPH_NAMES = { graph: "model.onnx", graph_fp16: "float16 graph", graph_wasm: "wasm graph" };

/** Which graph runs (manifest key): ?graph=fp16 | fp32 | wasm, or by the provider (auto). */
function graphVariant(ep, f16) {
  const pref = params.get("graph") || "auto";
  if (pref !== "auto") return { fp16: "graph_fp16", fp32: "graph", wasm: "graph_wasm" }[pref] || "graph";
  if (ep === "webgpu") return f16 ? "graph_fp16" : "graph";
  return "graph_wasm";
}

async function load(name, wanted = "auto", keepNotice = false) {
  await stopWarmUp();
  warmup = null; state.warmup = null; state.proxyWarmup = null;
  let proxy = null;
  $("error").hidden = true; $("stages").innerHTML = "";
  if (!keepNotice) $("notice").hidden = true;
  document.body.dataset.ready = "";
  $("load-btn").disabled = true;
  const t0 = performance.now();
  const pool = new DecoderPool(workers());
  let manifest = null;                  // the bundle being loaded, once its manifest is in (for error messages)
  try {
    await pool.start();
    const poolReadyAt = performance.now();
    // the provider decides which graph is fetched: shader-f16 WebGPU adapters run the float16 graph, the WASM EP
    // the group-GEMM graph (onnxruntime-web's wasm MatMulNBits is ~10x slower than its integer GEMM: README)
    let { ep, why, f16 } = await chooseProvider(wanted);
    const base = `/bundles/${encodeURIComponent(name)}/`;
    // on the WASM EP, the bundle's warm-up model runs while the weights download and decode (proxyWarmUp)
    const startProxy = (m) => {
      if (ep === "wasm" && !["0", "after"].includes(params.get("warmup")) && m.warmup) proxy = proxyWarmUp(`${base}${m.warmup.dir}/`);
    };
    const bundle = await loadBundle(base, pool, (p) => {
      $("progress").value = p.done / p.total;
      $("progress-text").textContent = `${p.stage}: ${mb(p.done)} / ${mb(p.total)} (${(100 * p.done / p.total).toFixed(0)}%)`;
    }, graphVariant(ep, f16), { into: params.get("into") !== "0", onManifest: startProxy });
    manifest = bundle.manifest;
    if (proxy) state.proxyWarmup = await proxy.finish();     // stopped after its current step, its session gone
    $("progress").value = 1;
    stage("download", bundle.timings.downloadMs);
    stage("decode (after download)", bundle.timings.decodeAfterDownloadMs);
    $("progress-text").textContent = `${mb(bundle.stats.networkBytes)} from network, ${mb(bundle.stats.cachedBytes)} from cache`;
    const ts = performance.now();
    const bundleDoneAt = ts;
    const weightBytes = bundle.externalData.reduce((n, x) => n + x.data.byteLength, 0);
    let session;
    try {
      const wantVariant = graphVariant(ep, f16), asked = (params.get("graph") || "auto") !== "auto";
      if (bundle.graphVariant !== "graph") why += `, ${GRAPH_NAMES[bundle.graphVariant]}`;
      else if (wantVariant !== "graph" && (asked || wantVariant === "graph_fp16")) {
        why += ` (bundle has no ${GRAPH_NAMES[wantVariant]}: model.onnx)`;   // an f32 bundle has no wasm graph
      }
      const create = DecoderSession.create(bundle.graph, bundle.externalData, bundle.manifest.config, ep,
                                           threads, { ...sessionOpts, float16: bundle.graphVariant === "graph_fp16",
                                                      build: ep === "webgpu" ? "webgpu" : sessionOpts.build,
                                                      ...bundleOpts(bundle.manifest, bundle.graphVariant, weightBytes, ep) });
      // a WebGPU device that never answers must not leave the page loading forever
      session = ep === "webgpu" ? await Promise.race([create, new Promise((_, reject) =>
        setTimeout(() => reject(new Error("no answer from the GPU within 60 s")), 60_000))]) : await create;
    } catch (e) {
      if (ep !== "webgpu") throw e;
      notice(`WebGPU session failed (${e.message}); running on WASM instead.`);
      ep = "wasm"; why = "WebGPU session creation failed";
      // model.onnx: the decoded weights are laid out for the graph chosen for WebGPU (packed codes), which the
      // wasm graph (transposed codes) cannot read
      const g = bundle.graphVariant === "graph" ? bundle.graph : await bundle.fetchGraph("graph");
      session = await DecoderSession.create(g, bundle.externalData, bundle.manifest.config, ep, threads,
                                            { ...sessionOpts, ...bundleOpts(bundle.manifest, "graph", weightBytes, ep) });
    }
    pool.terminate();
    // onnxruntime owns the weights now (copied into its heap): free our copies. Dropping the references alone
    // left them to the next garbage collection — measured 147 MiB of JS heap still held after SmolLM2 int8 loaded;
    // transfer(0) detaches each buffer and releases its memory now
    for (const x of bundle.externalData) x.data.buffer.transfer?.(0);
    bundle.externalData.length = 0;
    const sessionMs = performance.now() - ts;
    stage("session", sessionMs);
    const tp = performance.now();
    const py = await pyReady;
    await py.setup(bundle.tokenizer, bundle.manifest);
    stage(`python (started in ${(py.startMs / 1000).toFixed(1)} s)`, performance.now() - tp);
    stage("total", performance.now() - t0);
    // all times in ms; *At are performance.now() values, i.e. ms since navigation started
    state.loadTimings = { ...bundle.timings, loadStartAt: t0, poolReadyAt, bundleDoneAt, sessionMs, pythonWaitMs: performance.now() - tp,
                          pyStartMs: py.startMs, readyAt: performance.now(), threads };
    $("ep-badge").textContent = `${ep.toUpperCase()} — ${why}`;
    $("ep-badge").className = `badge ${ep}`;
    Object.assign(state, { session, manifest: bundle.manifest, py, ep, ortBuild: session.build,
                           numThreads: session.numThreads, name, history: [], weightBytes,
                           heapReserved: session.heapReserved, busy: false });
    if (ep === "webgpu") watchDevice(name, session);
    $("chat").hidden = false;
    document.body.dataset.ready = "1";
    if (ep === "wasm" && params.get("warmup") !== "0") warmUp(session);
    return { ep, why, timings: state.loadTimings };
  } catch (e) {
    pool.terminate();
    if (proxy) await proxy.finish(false);
    showError(explain(e, "loading failed", manifest));
    document.body.dataset.ready = "error";
    throw e;
  } finally {
    $("load-btn").disabled = false;
  }
}

/** A WebGPU device can be lost at any time (driver reset, GPU process crash, out of memory, another tab): then
 * the session cannot run again, so the model is reloaded on WASM — from the browser cache, no network — with a
 * notice saying why. */
async function watchDevice(name, session) {
  const device = await webgpuDevice();
  if (!device) return;
  device.lost.then((info) => {
    if (state.session !== session) return;                 // a later load replaced this session
    gpuFailed(`WebGPU device lost (${info.reason || "unknown"}${info.message ? `: ${info.message}` : ""})`);
  });
}

let gpuFallback = null;
function gpuFailed(why) {
  if (gpuFallback) return gpuFallback;
  state.stopRequested = true;
  const name = state.name;
  state.session = null;
  $("chat").hidden = true;
  notice(`${why}; reloading the model on WASM from the browser cache.`);
  gpuFallback = load(name, "wasm", true).finally(() => { gpuFallback = null; });
  return gpuFallback;
}

/** Generate a reply; streams into `onText`. Returns the tokens and timings. reuse: keep the session's KV cache of
 * the prompt's first tokens when they are the ones it already ran (a chat's earlier turns: only the new message
 * is prefilled); without it every call starts from an empty cache (the test hook's default: bench/ and e2e/
 * measure whole prefills). */
async function generate(messages, sampling, onText = () => {}, raw = null, reuse = false) {
  const { session, py } = state;
  const askedAt = performance.now();
  state.stopRequested = false; state.busy = true;
  try {
    await stopWarmUp();       // asked for a reply: a warm-up still running stops after its current step
    const r = await generateReply(session, py, messages, sampling, onText, raw, reuse);
    // from the call on (profile.startAt is the first run's start: after the warm-up's stop and the tokenizer)
    r.profile.askedAt = askedAt;
    r.firstTokenMs = r.profile.firstTokenAt - askedAt;
    return r;
  } finally {
    state.busy = false;       // also when Python refuses the prompt (longer than the context) or a run fails
  }
}

async function generateReply(session, py, messages, sampling, onText, raw, reuse) {
  const start = await py.start(messages, sampling, raw, reuse ? session.reusableTokens() : []);
  await session.rewind(start.reused);
  let ids = start.ids, positions = 1, sampled = 0;
  // greedy needs each position's largest logit only: 1 candidate instead of TOP_CANDIDATES to find and hand over
  // (?greedy-candidates=N: N, for an A/B against the old way)
  const candidates = Number(sampling.temperature) > 0 ? TOP_CANDIDATES : Number(params.get("greedy-candidates")) || 1;
  const promptLen = ids.length + start.reused;
  const tokens = [];
  let text = "", reason = "", prefillMs = 0, decodeMs = 0, steps = 0, pushMs = 0, yieldMs = 0, firstTokenAt = 0;
  let prefillSession = null;
  const stepMs = [];      // each decode step's session.forward, ms: the first reply after a load shows V8's warm-up
  const t0 = performance.now();
  while (ids) {
    if (state.stopRequested) { const tail = await py.cancel(); text += tail; onText(tail); reason = "cancelled"; break; }
    const ts = performance.now();
    const cand = await session.forward(ids, positions, candidates);
    const dt = performance.now() - ts;
    if (steps++ === 0) { prefillMs = dt; prefillSession = session.takeProfile(); } else {
      decodeMs += dt;
      stepMs.push(dt);
    }
    const tpush = performance.now();
    const r = await py.push(cand);
    if (steps === 1) firstTokenAt = performance.now(); else pushMs += performance.now() - tpush;
    // a lookahead step's drafts the model did not confirm: their cache goes (only the length, for the wasm graph)
    if (r.rewind !== null && r.next) await session.rewind(r.rewind);
    tokens.push(...r.tokens);
    if (r.text) { text += r.text; onText(r.text); }
    ids = r.next; reason = r.reason; positions = r.positions; sampled = r.sampled;
    const tyield = performance.now();
    await yieldToPage();     // the wasm EP runs on this thread: let the page paint tokens and see the Stop click
    if (steps > 1) yieldMs += performance.now() - tyield;
  }
  const firstTokenMs = prefillMs;
  return { tokens, text, reason, promptTokens: promptLen, cachedTokens: start.reused, messages: start.messages,
           dropped: start.dropped, prefillTokS: (promptLen - start.reused) / (prefillMs / 1000),
           // tokens the runs after the prefill chose (a lookahead step may give several), per second
           decodeTokS: steps > 1 ? (sampled - 1) / (decodeMs / 1000) : 0, decodeTokens: Math.max(sampled - 1, 0),
           firstTokenMs, totalMs: performance.now() - t0,
           // where the time went (bench/): forward = session.forward (ort-session.js splits it: prefillSession for
           // the first call, session for the decode steps), push = Pyodide, yield = yieldToPage; decode steps only
           profile: { startAt: t0, firstTokenAt, steps, prefillMs, decodeMs, pushMs, yieldMs, prefillSession, stepMs,
                      session: session.takeProfile() } };
}

/** On the WASM EP a first visit's first reply is slow: V8 runs onnxruntime-web's wasm in its baseline tier first
 * and recompiles the hot functions with its optimizing compiler, in the background, while that reply runs
 * (docs/page-bench.md, session 25: int4-m32's first 30 decode steps at 30–60 ms instead of 29, at 2 threads
 * 40–60 instead of ~20). A return visit takes the optimized code from V8's code cache. So while the page waits for
 * the first message, it runs throwaway decode steps: up to WARMUP_STEPS, until the last WARMUP_SETTLED steps are
 * within 5 % of the fastest (a return visit: a few steps); a reply asked for stops it after its current step
 * (stopWarmUp). ?warmup=0: none. The cache it made is emptied, its profile dropped. */
const WARMUP_STEPS = 48;
const WARMUP_SETTLED = 6;
let warmup = null;      // the latest: { stop, done: Promise, settled }; state.warmup: what it did, once done

function warmUp(session) {
  const w = { stop: false, settled: false };
  w.done = (async () => {
    const times = [];
    let ids = [session.config.bos_token_id ?? 0];
    const steps = Math.min(WARMUP_STEPS, (session.config.max_position_embeddings || Infinity) - 1);  // in context
    const t0 = performance.now();
    try {
      for (let i = 0; i < steps; i++) {
        await yieldToPage();                 // a click or a generate() call comes in between steps
        if (w.stop || state.session !== session) break;
        const ts = performance.now();
        const top = await session.forward(ids, 1, 1);
        times.push(performance.now() - ts);
        ids = [top.ids[0]];
        const last = times.slice(-WARMUP_SETTLED), fastest = Math.min(...times);
        if (last.length === WARMUP_SETTLED && Math.max(...last) <= 1.05 * fastest) { w.settled = true; break; }
      }
      await session.rewind(0);
    } catch (e) {
      console.warn(`warm-up stopped: ${e.message}`);
    } finally {
      session.takeProfile();
      state.warmup = { steps: times.length, ms: performance.now() - t0, settled: w.settled, stepMs: times };
    }
  })();
  warmup = w;
}

/** The warm-up model (converter/warmup_model.py: one small layer of random weights, the bundle's schemes and graph
 * layout), run while the real weights download and decode: by the time the real session exists, V8 has compiled
 * the kernels it shares with the warm-up model's session with its optimizing tier, so a first visit's first reply
 * no longer pays for that (session 26: int4-m32 at 2 threads, first reply 23–26 -> 35–48 tok/s). Up to PROXY_STEPS
 * decode steps, a short prompt first and again each time PROXY_WINDOW positions are used; stopped (finish) when
 * the real weights are in — after its current step, or once it has run PROXY_MIN_STEPS (~0.2 s; fewer left the
 * first reply half warmed up: its session only exists after onnxruntime-web's module has compiled) — and its
 * session released before the real one is made. Any failure only skips it. ?warmup=0: none; ?warmup=after: only
 * the warm-up after the load (warmUp). Returns { finish(full): Promise<what it did> }. */
const PROXY_STEPS = 400;
const PROXY_MIN_STEPS = 64;
const PROXY_PROMPT = 8;
const PROXY_WINDOW = 96;

function proxyWarmUp(url) {
  let stop = false, abort = false;
  const done = (async () => {
    const t0 = performance.now();
    const out = { steps: 0, prompts: 0, loadMs: 0, ms: 0, error: null };
    const pool = new DecoderPool(1);
    let session = null;
    try {
      await pool.start();
      const b = await loadBundle(url, pool, () => {}, "graph_wasm");
      pool.terminate();
      if (abort) return out;
      session = await DecoderSession.create(b.graph, b.externalData, b.manifest.config, "wasm", threads, { ...sessionOpts });
      for (const x of b.externalData) x.data.buffer.transfer?.(0);
      out.loadMs = performance.now() - t0;
      const span = Math.min(PROXY_WINDOW, b.manifest.config.max_position_embeddings);
      let ids = [];
      while ((!stop || (!abort && out.steps < PROXY_MIN_STEPS)) && out.steps < PROXY_STEPS) {
        if (!ids.length || session.length + 1 >= span) {      // a prompt: the prefill's kernels too
          await session.rewind(0);
          ids = Array.from({ length: PROXY_PROMPT }, (_, i) => 1 + i);
          out.prompts++;
        }
        const top = await session.forward(ids, 1, 1);
        out.steps++;
        ids = [top.ids[0]];
        await yieldToPage();          // the loader's work on this thread (fetch callbacks, progress) comes in between
      }
    } catch (e) {
      out.error = e.message;
      console.warn(`warm-up model skipped: ${e.message}`);
    } finally {
      pool.terminate();
      if (session) await session.session.release().catch(() => {});
      out.ms = performance.now() - t0;
    }
    return out;
  })();
  // full = false (the load failed): stop after the current step whatever the count
  return { finish: (full = true) => { stop = true; abort = !full; return done; } };
}

async function stopWarmUp() {
  if (!warmup) return;
  warmup.stop = true;
  await warmup.done;
}

/** Give the page a turn between tokens (the wasm EP and Pyodide both run on this thread), so that streamed text
 * is painted and a Stop click is seen. One macrotask through a MessageChannel is enough: the browser renders and
 * dispatches input between tasks whenever a frame is due, and unlike waiting for the next frame (?yield=frame,
 * the old way) it costs ~0.1 ms instead of up to a frame (16 ms) per token (bench/: "Speed and memory"). */
const yieldChannel = new MessageChannel();
const yieldWaiters = [];
yieldChannel.port1.onmessage = () => yieldWaiters.shift()();
let lastYield = 0;
function yieldToPage() {
  if (params.get("yield") === "frame") {
    const now = performance.now();
    if (now - lastYield < 30) return Promise.resolve();
    lastYield = now;
    if (document.hidden) return new Promise((resolve) => setTimeout(resolve, 0));
    return new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  }
  return new Promise((resolve) => { yieldWaiters.push(resolve); yieldChannel.port2.postMessage(0); });
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  return div;
}

function memoryLine() {
  const heap = performance.memory ? performance.memory.usedJSHeapSize : 0;
  let line = heap ? `, JS heap ${mb(heap)}` : "";
  if (state.ep === "webgpu" && state.manifest && state.session) {
    // GPU buffers we know of: the weights (uploaded once) and the KV cache of the current conversation
    const c = state.manifest.config, kvBytes = state.session.float16 ? 2 : 4;
    const kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * state.session.length * kvBytes;
    line += `, GPU buffers ≥ ${mb(state.manifest.totals.runtime_bytes + kv)} (weights + KV cache)`;
  }
  return line;
}

/** Whole-page memory where the browser offers it: the UA memory API's total (JS heaps, array buffers and
 * onnxruntime-web's shared wasm heap of the page and its workers) plus Pyodide's heap, a non-shared wasm memory
 * that the API does not count (bench/ua_memory_wasm.py). The API resolves after a GC, so the status line is
 * updated when it arrives. */
function reportPageMemory() {
  if (!self.crossOriginIsolated || !performance.measureUserAgentSpecificMemory) return;
  Promise.all([performance.measureUserAgentSpecificMemory(), state.py ? state.py.heapBytes() : 0]).then(([m, py]) => {
    if (!$("status").textContent.includes("page memory")) $("status").textContent += `, page memory ${mb(m.bytes + py)}`;
  }).catch(() => {});
}

async function onSend(ev) {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy || !state.session) return;
  $("input").value = "";
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  $("send-btn").disabled = true; $("stop-btn").disabled = false;
  const session = state.session;
  try {
    const r = await generate(state.history, {
      temperature: Number($("temperature").value), top_p: Number($("top-p").value),
      max_new_tokens: Number($("max-tokens").value), seed: Date.now() % 2 ** 31, lookahead: lookaheadFor(session),
    }, (piece) => { div.textContent += piece; }, null, true);
    if (r.dropped) {
      state.history = r.messages;
      notice(`The conversation outgrew the model's context: its ${r.dropped} oldest message(s) are left out.`);
    }
    state.history.push({ role: "assistant", content: r.text });
    const cached = r.cachedTokens ? ` (${r.cachedTokens} of ${r.promptTokens} prompt tokens from the cache)` : "";
    const runs = r.profile.steps - 1;     // with lookahead a run may give several tokens: say how many on average
    const perRun = runs > 0 && r.decodeTokens > runs ? ` (${(r.decodeTokens / runs).toFixed(2)} tokens a run)` : "";
    $("status").textContent = `prefill ${r.prefillTokS.toFixed(1)} tok/s${cached}, decode ${r.decodeTokS.toFixed(1)} tok/s${perRun}, ` +
      `first token ${(r.firstTokenMs / 1000).toFixed(2)} s, ${r.tokens.length} tokens (${r.reason})${memoryLine()}`;
    reportPageMemory();
  } catch (e) {
    // a session replaced meanwhile (device lost: gpuFailed already reloads, or has reloaded, on WASM) is not news
    if (state.session !== session) return;
    if (state.history.at(-1)?.role === "user") state.history.pop();   // unanswered: not part of the conversation
    if (state.ep === "webgpu") gpuFailed(`WebGPU failed during generation (${e.message})`).catch(() => {});
    else showError(explain(e, "generation failed", state.manifest));
  }
  finally { $("send-btn").disabled = false; $("stop-btn").disabled = true; }
}

$("load-btn").onclick = () => load($("bundle-select").value, $("ep-select").value).catch(() => {});
$("offline-btn").onclick = () => keepOffline().catch((e) => showError(`Could not keep the page for offline use: ${e.message}`));

/** Opt-in offline copy (static/sw.js): registers the service worker, then reloads the page with the chosen
 * bundle once, so that every file the page and its workers fetch passes through the worker and is kept (bundle
 * blobs are in loader.js's cache already). Later loads still go to the network first. */
async function keepOffline() {
  if (!("serviceWorker" in navigator)) throw new Error("this browser has no service workers");
  // ask the browser not to evict the kept files under storage pressure (it decides; refused is no error)
  if (navigator.storage && navigator.storage.persist) await navigator.storage.persist().catch(() => false);
  await navigator.serviceWorker.register("/sw.js");
  await navigator.serviceWorker.ready;
  const url = new URL(location.href);
  url.searchParams.set("bundle", $("bundle-select").value);
  url.searchParams.set("autoload", "1");
  location.replace(url.href);
}
/** Undoes keepOffline: unregisters the service worker and deletes its copy and the bundle blobs' cache. */
async function forgetOffline() {
  for (const r of await navigator.serviceWorker.getRegistrations()) await r.unregister();
  for (const name of await caches.keys()) if (name.startsWith("tiny-qmoe-")) await caches.delete(name);
  $("offline-badge").hidden = true;
  $("forget-btn").hidden = true;
  $("offline-btn").hidden = false;
  notice("The offline copy and the cached bundles are deleted; the next load downloads again.");
}
$("forget-btn").onclick = () => forgetOffline().catch((e) => showError(`Could not forget the offline copy: ${e.message}`));
if (navigator.serviceWorker && navigator.serviceWorker.controller) {
  $("offline-badge").hidden = false;
  $("forget-btn").hidden = false;
  $("offline-btn").hidden = true;
}
$("chat-form").onsubmit = onSend;
$("stop-btn").onclick = () => { state.stopRequested = true; };
$("new-btn").onclick = () => { state.history = []; $("messages").innerHTML = ""; };
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) onSend(e); });

window.tinyqmoe = {
  ready: listBundles().then(async (list) => {
    const want = params.get("bundle");
    if (want) $("bundle-select").value = want;
    if (params.get("autoload") && list.length) await load($("bundle-select").value, params.get("ep") || "auto");
    return list;
  }),
  load,
  pyReady,
  // bytes of onnxruntime-web's wasm heap (the plain build's; 0 for the WebGPU build's)
  ortHeapBytes: async () => (state.ortBuild === "wasm" ? (await import("./ort-heap.mjs")).heapBytes() : 0),
  // how that heap grows past its reservation: "exact" (by what an allocation needs) or "5%" (ort-heap.mjs)
  ortHeapGrowth: async () => (state.ortBuild === "wasm" ? (await import("./ort-heap.mjs")).heapGrowth() : ""),
  // prompt: a user message, or a whole conversation [{role, content}, ...]
  generate: (prompt, opts = {}) => generate(Array.isArray(prompt) ? prompt : [{ role: "user", content: prompt }],
                                            { max_new_tokens: opts.max_new_tokens ?? 16, temperature: opts.temperature ?? 0,
                                              top_k: opts.top_k ?? 0, top_p: opts.top_p ?? 1, seed: opts.seed ?? 0,
                                              ignore_eos: opts.ignore_eos ?? false,
                                              lookahead: opts.lookahead ?? (Number(lookaheadParam) || 0) },
                                            undefined, opts.raw ?? null, opts.reuse ?? false),
  stop: () => { state.stopRequested = true; },
  // the page is served through its offline copy's service worker (keepOffline)
  offline: () => !!(navigator.serviceWorker && navigator.serviceWorker.controller),
  // once the warm-up after a load (warmUp) has finished: what it did, {steps, ms, settled, stepMs}, or null
  warmedUp: async () => { if (warmup) await warmup.done; return state.warmup ?? null; },
  /** Destroys the WebGPU device the session runs on (e2e: what a lost device does to the page). */
  loseDevice: async () => { const d = state.ep === "webgpu" ? await webgpuDevice() : null; if (d) d.destroy(); return !!d; },
  state,
};
