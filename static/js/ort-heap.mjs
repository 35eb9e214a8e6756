// onnxruntime-web's plain wasm build, loaded through this module so that the page can size the build's heap
// before the weights go in (ort-session.js points ort.env.wasm.wasmPaths.mjs here).
//
// Why: the heap is one WebAssembly.Memory that Emscripten grows by 20 % of its size each time an allocation does
// not fit, and never shrinks. Session creation copies the weights in one tensor at a time, so the heap climbs
// 16 -> 19 -> 23 -> ... MiB and ends up to 20 % above what it needed: SmolLM2 int4-m32 needed 146.6 MiB (the
// weights, 128.8 MiB, the build's initial 16 MiB and a few MiB of session) and was left at 155.0, int4-g32 needed
// 166.0 and was left at 199 (docs/page-bench.md). Growing it once, to what the session will need, before the
// weights are copied in, leaves nothing to round up. The unused tail is never written, so the difference is
// committed memory (what performance.measureUserAgentSpecificMemory and the browser's memory limits count), not
// pages the OS has handed out.
//
// How: Emscripten's documented Module hook `instantiateWasm(imports, done)` gives us the imports, which hold the
// module's memory; we instantiate the same .wasm as the glue would. After growing the memory from outside, the
// glue's exported views (Module.HEAPU8, ...) still show the old length — the glue refreshes its internal views on
// every access, onnxruntime-web's JS reads the exported ones — so they are remade here.
import ortWasmThreaded from "/vendor/ort/ort-wasm-simd-threaded.mjs";
import { smallerSteps } from "./heap-steps.mjs";

const WASM_PAGE = 65536;
const MAX_PAGES = 65535;          // the glue's cap: 4294901760 bytes
const STEP = 1 << 20;             // past a reservation, the heap grows by what is asked for, at least this much
let memory = null;      // the module's WebAssembly.Memory, once instantiated
let module = null;      // the Emscripten module object onnxruntime-web uses
let pending = 0;        // bytes asked for before the module existed
let initialBytes = 0;   // the heap's size as the glue made it
let reserved = false;   // a reservation was made (a later one is refused)
let exactResizeHooked = false;   // emscripten_resize_heap replaced (exactResize)
let exactWanted = true;          // reserveHeap(bytes, "5%"): Emscripten's 5 % steps instead (A/B: ?heapgrowth=5)

/** How the heap grows past a reservation: "exact" (exactResize), else "5%" (smallerSteps alone). */
export function heapGrowth() {
  return exactResizeHooked && exactWanted ? "exact" : "5%";
}

/** The heap's size in bytes (0 before onnxruntime-web has started its wasm module). */
export function heapBytes() {
  return memory ? memory.buffer.byteLength : 0;
}

/**
 * Grows the heap to `bytes` beyond the size it starts with — as soon as it exists, before onnxruntime-web has
 * started its wasm module; now, when only a session that made no reservation has run (the page's warm-up model,
 * whose freed space the next session reuses) — and from then on lets it grow by what an allocation needs
 * (exactResize), or by 5 % at a time where that hook is missing (smallerSteps).
 * growth "5%": the 5 % steps even where the hook is in place (the page's ?heapgrowth=5, for A/B runs).
 * Returns false when a reservation was made already: the heap then holds earlier sessions, whose freed space the
 * next one reuses, so it is left to grow by itself.
 */
export function reserveHeap(bytes, growth = "exact") {
  if (reserved) return false;
  reserved = true;
  exactWanted = growth !== "5%";
  if (!memory) {
    pending = bytes;
    return true;
  }
  grownBy(initialBytes + bytes - memory.buffer.byteLength);
  smallerSteps(memory);
  refreshViews();
  return true;
}

/** Grows the heap by `bytes` (rounded up to pages; nothing when ≤ 0), never past wasm32's 4 GiB. A growth the
 * browser refuses is no error: the heap then grows as the session needs, as it would have without one. */
function grownBy(bytes) {
  if (bytes <= 0) return;
  const pages = Math.min(Math.ceil(bytes / WASM_PAGE), MAX_PAGES - memory.buffer.byteLength / WASM_PAGE);
  try {
    memory.grow(pages);
  } catch (e) {
    console.warn(`ort-heap.mjs: could not reserve ${bytes} bytes of heap (${e.message}); growing as needed`);
  }
}

function refreshViews() {
  if (!module) return;
  const buffer = memory.buffer;
  for (const key of Object.keys(module)) {
    const view = module[key];
    if (key.startsWith("HEAP") && ArrayBuffer.isView(view) && view.buffer !== buffer) {
      module[key] = new view.constructor(buffer);
    }
  }
}

/**
 * Past a reservation, the heap grows by what an allocation needs — at least STEP (1 MiB), not 5 % of the heap
 * (SmolLM2: 7.5 MiB; a Llama-3.2-1B heap: ~60 MiB) — so a conversation whose KV cache outgrows the reservation
 * costs its own bytes. Emscripten's resize (`emscripten_resize_heap`, an import of the module) only ever asks
 * memory.grow for 20, 10 or 5 % more and never says how much the allocation needs; this replaces that import,
 * found by the constant only it holds (its 96 MiB cap on overgrowth, 100663296), with one that grows the memory
 * to the requested size (rounded up to STEP). Before a reservation, when the import is not found (another
 * onnxruntime-web build), or when the browser refuses the growth, Emscripten's own resize runs as before.
 * Only this thread's module is hooked; a worker thread's resize still takes Emscripten's steps.
 */
function exactResize(imports) {
  for (const space of Object.values(imports)) {
    for (const [key, value] of Object.entries(space)) {
      if (typeof value !== "function" || !String(value).includes("100663296")) continue;
      space[key] = (requested) => {
        const need = requested >>> 0;
        const size = memory.buffer.byteLength;
        if (!reserved || !exactWanted || need <= size) return value(requested);
        const target = Math.min(MAX_PAGES * WASM_PAGE, Math.ceil(Math.max(need, size + STEP) / WASM_PAGE) * WASM_PAGE);
        if (target < need) return value(requested);
        try {
          WebAssembly.Memory.prototype.grow.call(memory, (target - size) / WASM_PAGE);   // past smallerSteps
        } catch (e) {
          return value(requested);
        }
        refreshViews();
        return true;
      };
      return true;
    }
  }
  return false;
}

function findMemory(imports) {
  for (const space of Object.values(imports)) {
    for (const value of Object.values(space)) if (value instanceof WebAssembly.Memory) return value;
  }
  throw new Error("onnxruntime-web's wasm module imports no memory");
}

async function instantiate(url, imports) {
  try {
    return await WebAssembly.instantiateStreaming(fetch(url, { credentials: "same-origin" }), imports);
  } catch (e) {   // a server without application/wasm: compile from the bytes instead
    const bytes = await (await fetch(url, { credentials: "same-origin" })).arrayBuffer();
    return WebAssembly.instantiate(bytes, imports);
  }
}

/** The glue's factory, with the instantiation hook; onnxruntime-web calls it as it would the glue's own. */
export default async function ortWasmWithHeap(moduleArg = {}) {
  const wasmName = "ort-wasm-simd-threaded.wasm";
  const url = moduleArg.locateFile ? moduleArg.locateFile(wasmName, "") : new URL(`/vendor/ort/${wasmName}`,
                                                                                   import.meta.url).href;
  let fail;
  const failed = new Promise((_, reject) => { fail = reject; });
  const arg = {
    ...moduleArg,
    instantiateWasm(imports, done) {
      memory = findMemory(imports);
      initialBytes = memory.buffer.byteLength;
      exactResizeHooked = exactResize(imports);
      if (pending) {
        grownBy(pending);
        smallerSteps(memory);
      }
      instantiate(url, imports).then((r) => done(r.instance, r.module), fail);
      return {};   // Emscripten: an empty object means "instantiating asynchronously"
    },
  };
  module = await Promise.race([ortWasmThreaded(arg), failed]);
  refreshViews();
  return module;
}
