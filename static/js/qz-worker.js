// One decoder per worker: instantiates qz.wasm once, then decodes chunks posted to it.
// Message in:  {batch: [{id, chunk: ArrayBuffer}, ...]}
// Message out: {results: [{id, out: ArrayBuffer} or {id, error, code}, ...], ms} — one message per batch
let qz = null;

const ERROR_NAMES = {1: "BAD_HEADER", 2: "TRUNCATED", 3: "BAD_CODE", 4: "OVERRUN", 5: "TRAILING",
                     6: "OUT_TOO_SMALL", 7: "BAD_SYMBOL", 64: "NO_MEMORY"};

async function init(module) {
  // the pool compiles qz.wasm once and posts the compiled module: workers only instantiate it
  const instance = await WebAssembly.instantiate(module, {});
  qz = instance.exports;
}

function decode(chunk) {
  const input = new Uint8Array(chunk);
  qz.qz_reset_heap();
  const inPtr = qz.qz_alloc(input.length);
  if (!inPtr) return { code: 64 };
  new Uint8Array(qz.memory.buffer, inPtr, input.length).set(input);
  const size = qz.qz_decoded_size(inPtr, input.length);
  if (size < 0) return { code: -size };
  const outPtr = qz.qz_alloc(Math.max(size, 1));
  if (!outPtr) return { code: 64 };
  const n = qz.qz_decode(inPtr, input.length, outPtr, size);
  if (n < 0) return { code: -n };
  // memory may have grown (detaching old views): take a fresh view, copy out
  return { out: new Uint8Array(qz.memory.buffer, outPtr, n).slice().buffer };
}

self.onmessage = async (ev) => {
  const msg = ev.data;
  if (msg.type === "init") {
    try { await init(msg.module); self.postMessage({ type: "ready" }); }
    catch (e) { self.postMessage({ type: "ready", error: String(e) }); }
    return;
  }
  const t0 = performance.now();
  const results = msg.batch.map(({ id, chunk }) => {
    const r = decode(chunk);
    return r.out ? { id, out: r.out } : { id, error: ERROR_NAMES[r.code] || `ERROR_${r.code}`, code: r.code };
  });
  self.postMessage({ results, ms: performance.now() - t0 }, results.filter((r) => r.out).map((r) => r.out));
};
