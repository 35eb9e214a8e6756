// One decoder per worker: instantiates qz.wasm once, then decodes chunks posted to it.
// Message in:  {batch: [{id, chunk: ArrayBuffer, tensor?: {key, chunks, nbytes, kn, outOff, bytes}}, ...]}
// Message out: {results: [{id, out: ArrayBuffer} | {id, n, complete?} | {id, error, code}, ...], ms} — one message
// per batch. Without `tensor` the decoded bytes come back in a new ArrayBuffer. With it (DecoderPool.decodeTensor)
// they go straight to their places in the tensor's buffers, which this worker allocates at its first chunk and
// owns until its last: the plain bytes at outOff of a buffer of nbytes (none when nbytes is 0), and the codes
// transposed, kn = {bytes, per, N, K}, into a (K, N) one-per-byte buffer (kn.js placeKn; the WASM graph's layout,
// converter/layouts.transposed_codes). With the last chunk, `complete` = {key, plain, kn} carries the buffers back,
// transferred. A chunk whose decoded size is not `bytes` writes nothing and reports that size, for the caller.
import { placeKn, placePieces } from "./kn.js";   // (a module worker: qz.js starts it with type "module")

let qz = null;
const tensors = new Map();   // key -> {left: chunks to come, plain: Uint8Array?, kn: Uint8Array?}

const ERROR_NAMES = {1: "BAD_HEADER", 2: "TRUNCATED", 3: "BAD_CODE", 4: "OVERRUN", 5: "TRAILING",
                     6: "OUT_TOO_SMALL", 7: "BAD_SYMBOL", 64: "NO_MEMORY"};

async function init(module) {
  // the pool compiles qz.wasm once and posts the compiled module: workers only instantiate it
  const instance = await WebAssembly.instantiate(module, {});
  qz = instance.exports;
}

/** Decode a chunk into wasm memory: {view} (valid until the next decode), or {n: size} when it is not `expect`
 * bytes, or {code} on an error. */
function decodeToView(chunk, expect) {
  const input = new Uint8Array(chunk);
  qz.qz_reset_heap();
  const inPtr = qz.qz_alloc(input.length);
  if (!inPtr) return { code: 64 };
  new Uint8Array(qz.memory.buffer, inPtr, input.length).set(input);
  const size = qz.qz_decoded_size(inPtr, input.length);
  if (size < 0) return { code: -size };
  if (expect !== undefined && size !== expect) return { n: size };
  const outPtr = qz.qz_alloc(Math.max(size, 1));
  if (!outPtr) return { code: 64 };
  const n = qz.qz_decode(inPtr, input.length, outPtr, size);
  if (n < 0) return { code: -n };
  return { view: new Uint8Array(qz.memory.buffer, outPtr, n) };   // memory may have grown: a fresh view
}

function decode(chunk, t) {
  const r = decodeToView(chunk, t ? t.bytes : undefined);
  if (!r.view) return r;
  if (!t) return { out: r.view.slice().buffer };
  let s = tensors.get(t.key);
  if (!s) {
    s = { left: t.chunks, plain: t.nbytes ? new Uint8Array(t.nbytes) : null, kn: t.kn ? new Uint8Array(t.kn.bytes) : null };
    tensors.set(t.key, s);
  }
  if (s.plain && t.pieces) placePieces(r.view, { dst: s.plain, ...t.pieces, outOff: t.outOff });   // the wasm graph's order
  else if (s.plain) s.plain.set(r.view, t.outOff);
  if (s.kn) placeKn(r.view, { dst: s.kn, per: t.kn.per, N: t.kn.N, K: t.kn.K, outOff: t.outOff, width: t.kn.width });
  if (--s.left > 0) return { n: r.view.length };
  tensors.delete(t.key);
  return { n: r.view.length, complete: { key: t.key, plain: s.plain && s.plain.buffer, kn: s.kn && s.kn.buffer } };
}

self.onmessage = async (ev) => {
  const msg = ev.data;
  if (msg.type === "init") {
    try { await init(msg.module); self.postMessage({ type: "ready" }); }
    catch (e) { self.postMessage({ type: "ready", error: String(e) }); }
    return;
  }
  const t0 = performance.now();
  const transfer = [];
  const results = msg.batch.map(({ id, chunk, tensor }) => {
    let r;
    try { r = decode(chunk, tensor); }
    catch (e) { return { id, error: `cannot place the decoded bytes (${e.message})`, code: 0 }; }   // a lying target
    if (r.out) { transfer.push(r.out); return { id, out: r.out }; }
    if (r.complete) { for (const b of [r.complete.plain, r.complete.kn]) if (b) transfer.push(b); }
    if (r.n !== undefined) return { id, n: r.n, complete: r.complete };
    return { id, error: ERROR_NAMES[r.code] || `ERROR_${r.code}`, code: r.code };
  });
  self.postMessage({ results, ms: performance.now() - t0 }, transfer);
};
