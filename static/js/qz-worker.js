// One decoder per worker: instantiates qz.wasm once, then decodes chunks posted to it.
// Message in:  {batch: [{id, chunk: ArrayBuffer, into?: {bytes, dst?, kn?}}, ...]}
// Message out: {results: [{id, out: ArrayBuffer} | {id, n} | {id, error, code}, ...], ms} — one message per batch.
// Without `into` the decoded bytes come back in a new ArrayBuffer. With it they go straight to their places in
// the page's initializer buffers, views of SharedArrayBuffers this worker shares with the page: dst (a
// Uint8Array of exactly `bytes` bytes) gets them as they are; kn = {dst, per, N, K, outOff} gets the chunk's codes
// (per codes a byte, rows of K codes starting at byte outOff of an (N, K) tensor) one per byte at their [k][n]
// places of the (K, N) array dst (the WASM graph's transposed layout, converter/layouts.transposed_codes). Only
// the byte count comes back: no buffer per chunk, and the page's thread copies nothing. A chunk whose decoded
// size is not `bytes` writes nothing and reports that size, for the caller's error.
import { placeKn } from "./kn.js";   // (a module worker: qz.js starts it with type "module")

let qz = null;

const ERROR_NAMES = {1: "BAD_HEADER", 2: "TRUNCATED", 3: "BAD_CODE", 4: "OVERRUN", 5: "TRAILING",
                     6: "OUT_TOO_SMALL", 7: "BAD_SYMBOL", 64: "NO_MEMORY"};

async function init(module) {
  // the pool compiles qz.wasm once and posts the compiled module: workers only instantiate it
  const instance = await WebAssembly.instantiate(module, {});
  qz = instance.exports;
}

function decode(chunk, into) {
  const input = new Uint8Array(chunk);
  qz.qz_reset_heap();
  const inPtr = qz.qz_alloc(input.length);
  if (!inPtr) return { code: 64 };
  new Uint8Array(qz.memory.buffer, inPtr, input.length).set(input);
  const size = qz.qz_decoded_size(inPtr, input.length);
  if (size < 0) return { code: -size };
  if (into && size !== into.bytes) return { n: size };
  const outPtr = qz.qz_alloc(Math.max(size, 1));
  if (!outPtr) return { code: 64 };
  const n = qz.qz_decode(inPtr, input.length, outPtr, size);
  if (n < 0) return { code: -n };
  // memory may have grown (detaching old views): take a fresh view
  const view = new Uint8Array(qz.memory.buffer, outPtr, n);
  if (into) {
    if (into.dst) into.dst.set(view);
    if (into.kn) placeKn(view, into.kn);
    return { n };
  }
  return { out: view.slice().buffer };
}

self.onmessage = async (ev) => {
  const msg = ev.data;
  if (msg.type === "init") {
    try { await init(msg.module); self.postMessage({ type: "ready" }); }
    catch (e) { self.postMessage({ type: "ready", error: String(e) }); }
    return;
  }
  const t0 = performance.now();
  const results = msg.batch.map(({ id, chunk, into }) => {
    const r = decode(chunk, into);
    if (r.out) return { id, out: r.out };
    if (r.n !== undefined) return { id, n: r.n };
    return { id, error: ERROR_NAMES[r.code] || `ERROR_${r.code}`, code: r.code };
  });
  self.postMessage({ results, ms: performance.now() - t0 }, results.filter((r) => r.out).map((r) => r.out));
};
