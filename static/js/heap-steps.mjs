// Emscripten's heaps grow by 20 % of their size when an allocation does not fit, and never shrink. Its resize
// (emscripten_resize_heap in its library.js) asks memory.grow for max(needed, min(1.2 x size, needed + 96 MiB)),
// and when that throws, for the same with 1.1 x, then with 1.05 x, each rounded up to 64 KiB. smallerSteps makes
// a memory refuse the first two attempts of a resize that would grow it by more than 5 %, so the third — 5 %, or
// what the allocation needs if that is more — is taken. Used on onnxruntime-web's heap past its reservation where
// ort-heap.mjs cannot replace the resize, and on Pyodide's heap (py-glue.js), which starts at 30 MiB and whose
// first 20 % step took it to 36 MiB for the 2 MiB the runtime needed beyond (docs/page-bench.md, session 28).
// Only the thread whose glue grows the memory is affected (the hook is on this thread's Memory object).

const WASM_PAGE = 65536;

/** @param {WebAssembly.Memory} mem @param {number} fraction the largest step taken without a refusal */
export function smallerSteps(mem, fraction = 0.05) {
  if (!mem || mem.__smallerSteps) return mem;
  const grow = mem.grow.bind(mem);
  let refused = 0;    // attempts of the current resize refused so far
  mem.grow = (delta) => {
    const size = mem.buffer.byteLength;
    if (delta * WASM_PAGE > Math.ceil((size * fraction) / WASM_PAGE) * WASM_PAGE && refused < 2) {
      refused++;
      throw new RangeError("heap-steps.mjs: a smaller step, please");
    }
    refused = 0;
    return grow(delta);
  };
  mem.__smallerSteps = true;
  return mem;
}
