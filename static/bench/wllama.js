// Bench host for wllama (npm @wllama/wllama: llama.cpp compiled to WASM), served from /vendor/wllama like
// onnxruntime-web is from /vendor/ort — never from a CDN. python -m bench drives it through window.wbench:
//   await wbench.load(url, {threads, gpuLayers, nCtx}) -> {fetchMs, initMs, threads, multithread}
//   await wbench.complete(prompt, maxTokens, ban)      -> llama.cpp's own timings (prompt/predicted ms and n)
import { Wllama } from "/vendor/wllama/index.js";

const log = (msg) => { document.getElementById("log").textContent += msg + "\n"; };
let wllama = null;

async function load(url, { threads = 1, gpuLayers = 0, nCtx = 512 } = {}) {
  const t0 = performance.now();
  const res = await fetch(url);
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  const blob = await res.blob();
  const t1 = performance.now();
  wllama = new Wllama({ default: "/vendor/wllama/wasm/wllama.wasm" }, { suppressNativeLog: new URLSearchParams(location.search).get("log") !== "1" });
  await wllama.loadModel([blob], { n_threads: threads, n_gpu_layers: gpuLayers, n_ctx: nCtx, n_parallel: 1 });
  const t2 = performance.now();
  const info = wllama.getLoadedContextInfo();     // wllama reports success even when llama.cpp refused the file
  if (!info || !info.n_vocab) throw new Error(`wllama loaded no model from ${url} (llama.cpp's log: ?log=1)`);
  log(`loaded ${url}: ${wllama.getNumThreads()} threads, multithread ${wllama.isMultithread()}`);
  return { fetchMs: t1 - t0, initMs: t2 - t1, readyAt: t2, threads: wllama.getNumThreads(),
           multithread: wllama.isMultithread(), bytes: blob.size };
}

/** Greedy completion of a raw prompt for exactly maxTokens tokens (eos ignored), timed by llama.cpp itself. */
async function complete(prompt, maxTokens, ban = []) {
  const t0 = performance.now();
  const logit_bias = ban.map((id) => [id, false]);   // llama.cpp server format; false: never
  const r = await wllama.createCompletion({ prompt, max_tokens: maxTokens, temperature: 0, top_k: 1,
                                            ignore_eos: true, cache_prompt: false, logit_bias });
  const wallMs = performance.now() - t0;
  const t = r.timings || {};
  return { text: r.choices[0].text, wallMs, promptTokens: t.prompt_n, promptMs: t.prompt_ms,
           newTokens: t.predicted_n, predictedMs: t.predicted_ms,
           prefillTokS: t.prompt_per_second, decodeTokS: t.predicted_per_second };
}

window.wbench = { load, complete, ready: true };
