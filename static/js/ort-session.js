// The only module that imports onnxruntime-web (its wasm build's glue comes through ort-heap.mjs). Creates the
// decoder session (WebGPU when an adapter exists, else WASM) and implements the runtime's session interface:
// forward(ids) -> top-k candidates of the last position, keeping the KV cache between calls.
// Two builds of onnxruntime-web: "webgpu" (ort.webgpu.min.mjs: WebGPU EP + WASM EP, a wasm binary with the JSEP
// glue) and "wasm" (ort.wasm.min.mjs: the plain SIMD + threads binary, CPU only). A session on the WASM EP uses the
// plain build unless ?ort=webgpu asks otherwise (measured side by side: README "The page"). Each build is imported
// once, on first use; a session and the tensors fed to it come from the same build.
const ORT_BUILDS = { webgpu: "/vendor/ort/ort.webgpu.min.mjs", wasm: "/vendor/ort/ort.wasm.min.mjs" };
const ortBuilds = {};
const ORT_HEAP_MODULE = "/static/js/ort-heap.mjs";

/** The onnxruntime-web module of a build ("webgpu" | "wasm"), imported and configured on first use. */
export async function ortBuild(build) {
  if (!ORT_BUILDS[build]) throw new Error(`unknown onnxruntime-web build ${build}`);
  if (!ortBuilds[build]) {
    ortBuilds[build] = import(ORT_BUILDS[build]).then((ort) => {
      // the plain build's glue is loaded through ort-heap.mjs, which lets create() size its heap (HEAP_MARGIN)
      ort.env.wasm.wasmPaths = build === "wasm"
        ? { mjs: ORT_HEAP_MODULE, wasm: "/vendor/ort/ort-wasm-simd-threaded.wasm" } : "/vendor/ort/";
      ort.env.logLevel = "error";
      return ort;
    });
  }
  return ortBuilds[build];
}

/** Positions per session.run that keep a prefill's activations near PREFILL_BUDGET bytes. The wasm graph (group
 * schemes) multiplies each group of 32 or 64 inputs separately and sums the groups after: its GEMMs make
 * float32 [groups, positions, N] partial sums, 4 * groups * N bytes per position. SmolLM2 int4-g32: 108 KiB per
 * position (151 positions, cut to MAX_PIECE); Llama-3.2-1B: 2 MiB (the MLP's 64 x 8192 and 256 x 2048), and a
 * 41-token prompt in one run grew onnxruntime-web's heap, which never shrinks, from 1.45 to 2.95 GiB (README).
 * Where the budget leaves pieces shorter than MIN_PIECE positions and the weights (`weightBytes`, what the
 * session is given) fill at most half of the 4 GiB a wasm32 heap can reach, the budget doubles, up to MIN_PIECE
 * positions. Measured (docs/scaling.md): a Llama-3.2-1B-shaped int4-g32 model, 8 -> 16 positions a piece,
 * prefills 13.7 -> 16.5 tok/s for 1,477 -> 1,578 MiB of page memory (1.12 -> 1.19x its weights); a 3B-shaped
 * one would gain too but sits too close to the cap; SmolLM2 int4-g32, 151 -> 302 positions, prefilled a
 * 769-token prompt no faster (159-168 against 153-161 tok/s) for 404 -> 475 MiB, hence the cap at MIN_PIECE.
 * And on the WASM EP no piece is longer than MAX_PIECE positions, whatever the graph: SmolLM2 int4-g32 prefilled
 * that prompt as fast in pieces of 64 as of 151 (160 against 155-159 tok/s; 32: 141) and the page then held 345
 * instead of 404 MiB; SmolLM2 int8 (model.onnx, no partial sums) 244 against 229-239 tok/s in one run, 276
 * instead of 321 MiB. On WebGPU (not measurable here: SwiftShader) model.onnx prompts still run whole. */
export function prefillRows(manifest, variant, weightBytes = Infinity, ep = "wasm") {
  const cap = ep === "wasm" ? MAX_PIECE : Infinity;
  const perRow = partialSumBytes(manifest, variant);
  if (!perRow) return cap;
  const rows = (budget) => Math.max(1, Math.floor(budget / perRow));
  let n = rows(PREFILL_BUDGET);
  if (n < MIN_PIECE && weightBytes <= 2 * 2 ** 30) n = Math.min(MIN_PIECE, rows(2 * PREFILL_BUDGET));
  return Math.min(n, cap);
}

/** Bytes of float32 partial sums a position costs in the largest GEMM of a graph that multiplies each group
 * separately (the wasm graph of the group schemes; 0 for any other graph). */
export function partialSumBytes(manifest, variant) {
  const transposed = (manifest[variant] && manifest[variant].transposed) || {};
  let perRow = 0;
  for (const e of manifest.initializers) {
    if (e.name in transposed) perRow = Math.max(perRow, 4 * e.shape[0] * e.shape[1]);   // codes (N, groups, bytes)
  }
  return perRow;
}

/** Bytes of heap, beyond the weights and what the module holds when it starts, that a first session on the plain
 * wasm build is given before its weights are copied in (ort-heap.mjs): HEAP_MARGIN plus a prefill piece's
 * partial sums. Measured on SmolLM2 (docs/page-bench.md, pre-grown heaps, load + a 7-token prompt + 16 tokens,
 * 1 thread): the heap's high-water mark was 16 MiB + the weights + 1.8 (int4-m32), 2.4 (int8), 3.8 (int4-g64,
 * with 3.5 MiB of partial sums) and 6.0 MiB (int4-g32, 6.9 MiB of partial sums); every position of KV cache added
 * ~42 KB (int4-m32) while the wasm graph concatenated it; appended (KvAppendCache), one copy of it less (int8 at 73
 * positions: a high-water mark 2.2 MiB lower, docs/page-bench.md session 23). A heap that has to grow past it grows
 * by what the allocation asks for, at least 1 MiB (ort-heap.mjs, since session 27; before, by 5 % steps: at
 * Llama-3.2-1B's shape int4-g32's first prefill piece outgrew it by three and ended 2.5 % above where Emscripten's
 * 20 % steps had). */
export function heapReserve(weightBytes, manifest, variant, rows) {
  return weightBytes + HEAP_MARGIN + partialSumBytes(manifest, variant) * Math.min(rows, MAX_PIECE);
}

export const HEAP_MARGIN = 4 << 20;
export const PREFILL_BUDGET = 16 << 20;
export const MIN_PIECE = 16;
export const MAX_PIECE = 64;

/** onnxruntime-web threads when the page does not say (?threads=): 1 without cross-origin isolation (no shared
 * memory), else as many as the cores, up to 4. On 2 cores a second thread slows the first reply after a load and
 * speeds up every later one (session 24, `bench/later_replies.py`, SmolLM2 on this 2-core machine: int4-m32 decode
 * 28.9 -> 26.7 tok/s for the first reply, 34.1 -> 44.7 for the later ones; int8 30.7 -> 24.0 and 35.2 -> 45.4; a
 * Llama-3.2-1B-shaped model +22 % decode from the first reply, session 12). Earlier sessions measured only first
 * replies and kept 1 thread on 2 cores for models under 512 MB. weightBytes: kept for callers; the size no longer
 * decides. */
export function defaultThreads(weightBytes) {   // eslint-disable-line no-unused-vars
  if (!self.crossOriginIsolated) return 1;
  const cores = navigator.hardwareConcurrency || 1;
  return Math.max(1, Math.min(4, cores));
}

export const TOP_CANDIDATES = 256;   // must equal converter/runtime/generate.py TOP_CANDIDATES

/** Which execution provider to use and why. @param {string} wanted "auto" | "webgpu" | "wasm" */
export async function chooseProvider(wanted = "auto") {
  if (wanted === "wasm") return { ep: "wasm", why: "requested" };
  if (!("gpu" in navigator)) return { ep: "wasm", why: "this browser has no WebGPU" };
  let adapter = null;
  try { adapter = await navigator.gpu.requestAdapter(); } catch (e) { /* reported below */ }
  if (!adapter) return { ep: "wasm", why: "no WebGPU adapter" };
  // a fallback adapter is a software rasteriser (SwiftShader): seconds per token where the WASM EP does 10-15 tok/s
  // (README, bench) — auto takes WASM there; ?ep=webgpu still gets it
  if (wanted === "auto" && (adapter.info?.isFallbackAdapter || adapter.isFallbackAdapter)) {
    return { ep: "wasm", why: "the only WebGPU adapter is a software fallback (slower than WASM)" };
  }
  const f16 = adapter.features.has("shader-f16");
  return { ep: "webgpu", f16, why: f16 ? "WebGPU adapter with shader-f16" : "WebGPU adapter without shader-f16: float32 graph" };
}

/** The GPUDevice the WebGPU EP runs on — call only once a WebGPU session exists (before, onnxruntime-web would
 * create one). null when there is none. */
export async function webgpuDevice() {
  if (!ortBuilds.webgpu) return null;
  try { return (await (await ortBuilds.webgpu).env.webgpu.device) || null; } catch { return null; }
}

export class DecoderSession {
  /**
   * @param {Uint8Array} graph model.onnx bytes
   * @param {{path: string, data: Uint8Array}[]} externalData decoded initializers
   * @param {object} config the manifest's LlamaConfig dict
   * @param {string} ep "webgpu" | "wasm"
   * @param {number} threads wasm threads, 0 = defaultThreads (by the cores and the size of the weights)
   * @param {{kvOnDevice?: boolean, float16?: boolean, build?: string}} opts kvOnDevice: on WebGPU, keep present.*
   *   in GPU buffers and feed them back as the next past (no download + upload of the whole cache per token);
   *   float16: the graph is model.fp16.onnx (float16 KV cache); build: onnxruntime-web build, "auto" (default:
   *   "webgpu" for the WebGPU EP, "wasm" for the WASM EP), "webgpu" or "wasm"
   */
  static async create(graph, externalData, config, ep, threads = 0, opts = {}) {
    const build = !opts.build || opts.build === "auto" ? (ep === "webgpu" ? "webgpu" : "wasm") : opts.build;
    if (ep === "webgpu" && build !== "webgpu") throw new Error(`the ${build} build of onnxruntime-web has no WebGPU EP`);
    const ort = await ortBuild(build);
    ort.env.wasm.numThreads = threads || defaultThreads(externalData.reduce((n, x) => n + x.data.byteLength, 0));
    const kvOnDevice = ep === "webgpu" && !!opts.kvOnDevice;
    const options = { executionProviders: [ep], externalData, graphOptimizationLevel: "all" };
    if (kvOnDevice) {
      options.preferredOutputLocation = {};
      for (let i = 0; i < config.num_hidden_layers; i++) {
        for (const kind of ["key", "value"]) options.preferredOutputLocation[`present.${i}.${kind}`] = "gpu-buffer";
      }
    }
    let heapReserved = 0;
    const heap = build === "wasm" && opts.heapBytes ? await import(ORT_HEAP_MODULE) : null;
    if (heap && heap.reserveHeap(opts.heapBytes, opts.heapGrowth)) {
      heapReserved = opts.heapBytes;
    }
    const session = await ort.InferenceSession.create(graph, options);
    // the KV cache's type as the graph declares it: float16 in the float16 graph and in the wasm graph
    const kvMeta = (session.inputMetadata || []).find((m) => m.name === "past_key_values.0.key");
    const kv16 = !!opts.float16 || (kvMeta && kvMeta.type === "float16");
    // the wasm graph takes its cache position-major ([1, past, kv, hd]) and returns only the new positions
    // (converter/onnx_export.py, attention_append): the page appends them to buffers it keeps (KvAppendCache)
    const append = !!(kvMeta && kvMeta.shape && kvMeta.shape[1] === "past_seq");
    const decoder = new DecoderSession(ort, session, config, ep, kvOnDevice, kv16, build, append);
    decoder.numThreads = ort.env.wasm.numThreads;   // what the wasm module runs with (fixed at its first session)
    decoder.maxRows = opts.maxRows || Infinity;
    decoder.heapReserved = heapReserved;
    return decoder;
  }

  constructor(ort, session, config, ep, kvOnDevice = false, float16 = false, build = "webgpu", append = false) {
    this.ort = ort;
    this.append = append;
    this.build = build;
    this.session = session;
    this.config = config;
    this.ep = ep;
    this.kvOnDevice = kvOnDevice;
    this.float16 = float16;
    this.profile = newProfile();
    this.maxRows = Infinity;     // positions per session.run (forward splits longer prompts): prefillRows
    this.reset();
  }

  /** Summed ms per part of forward() since the last call (bench/ reads it), then starts a new sum. */
  takeProfile() {
    const p = this.profile;
    this.profile = newProfile();
    return p;
  }

  reset() {
    const c = this.config;
    for (const t of Object.values(this.past || {})) release(t);
    this.past = {};
    this.length = 0;
    this.tokens = [];            // the ids the cache holds, in order (the runtime keeps the prefix a prompt repeats)
    if (this.append) {
      this.cache = new KvAppendCache(c, this.float16);
      return;
    }
    for (let i = 0; i < c.num_hidden_layers; i++) {
      for (const kind of ["key", "value"]) {
        this.past[`past_key_values.${i}.${kind}`] = this.float16
          ? new this.ort.Tensor("float16", new Uint16Array(0), [1, c.num_key_value_heads, 0, c.head_dim])
          : new this.ort.Tensor("float32", new Float32Array(0), [1, c.num_key_value_heads, 0, c.head_dim]);
      }
    }
  }

  /** The tokens whose cache a next prompt may keep (rewind). */
  reusableTokens() { return this.tokens; }

  /** Keep the cache of the first n tokens only; the next forward continues from position n. A cache in GPU
   * buffers (kvOnDevice) is read back once and cut on the CPU: the next run uploads it as its past, and its
   * present.* are GPU buffers again. */
  async rewind(n) {
    if (n === 0) { this.reset(); return; }
    if (!(n > 0 && n <= this.length)) throw new Error(`cannot rewind a cache of ${this.length} to ${n}`);
    if (this.append) {           // the positions past n are overwritten by the next run's
      this.length = n;
      this.tokens.length = n;
      return;
    }
    const c = this.config, T = this.length, hd = c.head_dim, heads = c.num_key_value_heads;
    for (const [name, t] of Object.entries(this.past)) {
      const data = /** @type {Float32Array|Uint16Array} */ (t.location === "cpu" ? t.data : await t.getData());
      const cut = new data.constructor(heads * n * hd);          // [1, heads, T, hd] -> [1, heads, n, hd]
      for (let h = 0; h < heads; h++) cut.set(data.subarray(h * T * hd, h * T * hd + n * hd), h * n * hd);
      if (t.dispose) t.dispose();
      this.past[name] = new this.ort.Tensor(t.type, cut, [1, heads, n, hd]);
    }
    this.length = n;
    this.tokens.length = n;
  }

  /** @param {number[]} ids new tokens after the cache @param {number} positions how many of the last positions'
   * candidates to return (1, or 1 + the draft tokens of a lookahead step: runtime/generate.py) @param {number} k
   * candidates per position (greedy needs 1: the largest logit, the lowest id among equals)
   * @returns {Promise<{ids: Int32Array, values: Float32Array, positions: number}>} k per position, the positions one
   *   after another */
  async forward(ids, positions = 1, k = TOP_CANDIDATES) {
    // a long prompt runs as several runs of at most maxRows positions each, the cache fed back in between: each
    // position attends to the same keys and values as in one run (the logits agree up to float rounding), and
    // the activations are those of maxRows positions at most
    // (a lookahead step's few positions always run together: their logits come from one run)
    const rows = Math.max(this.maxRows, positions);
    let i = 0;
    for (; ids.length - i > rows; i += rows) {
      const logits = await this.run(ids.slice(i, i + rows));
      if (logits.dispose) logits.dispose();
    }
    const logits = await this.run(ids.slice(i), positions);
    const p = this.profile, V = this.config.vocab_size;
    const t3 = performance.now();
    const data = /** @type {Float32Array} */ (await logits.getData());
    const kept = logits.dims[1];                    // the kept positions, or S for a graph that returns every one
    if (kept < positions) throw new Error(`the graph returned the logits of ${kept} positions, not ${positions}`);
    const t4 = performance.now();
    let top;
    if (positions === 1) {
      top = topK(data.subarray((kept - 1) * V, kept * V), k);
    } else {
      top = { ids: new Int32Array(positions * k), values: new Float32Array(positions * k) };
      for (let j = 0; j < positions; j++) {
        const r = kept - positions + j, t = topK(data.subarray(r * V, (r + 1) * V), k);
        top.ids.set(t.ids, j * k); top.values.set(t.values, j * k);
      }
    }
    top.positions = positions;
    if (logits.dispose) logits.dispose();
    const t5 = performance.now();
    p.calls++; p.logitsMs += t4 - t3; p.topkMs += t5 - t4;
    return top;
  }

  /** One session.run over `ids` after the cache; keeps the new cache, returns the logits tensor (of the last
   * `keep` positions). */
  async run(ids, keep = 1) {
    const p = this.profile, t0 = performance.now();
    const S = ids.length, T = this.length + S;
    const ort = this.ort;
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, S]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(T).fill(1n), [1, T]),
      position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: S }, (_, j) => BigInt(this.length + j)), [1, S]),
      ...(this.append ? this.cache.feeds(ort, this.length) : this.past),
    };
    // the lm_head on the last `keep` positions only (bundles built before session 3 have no such input: all positions)
    if (this.session.inputNames.includes("num_logits_to_keep")) {
      feeds.num_logits_to_keep = new ort.Tensor("int64", BigInt64Array.from([BigInt(keep)]), []);
    }
    const t1 = performance.now();
    const out = await this.session.run(feeds);
    const t2 = performance.now();
    if (this.append) {
      await this.cache.append(out, this.length, S);
    } else {
      for (let i = 0; i < this.config.num_hidden_layers; i++) {
        for (const kind of ["key", "value"]) {
          const old = this.past[`past_key_values.${i}.${kind}`];
          if (old !== out[`present.${i}.${kind}`]) release(old);
          this.past[`past_key_values.${i}.${kind}`] = out[`present.${i}.${kind}`];
        }
      }
    }
    this.length = T;
    for (const id of ids) this.tokens.push(id);
    p.runs++; p.feedsMs += t1 - t0; p.runMs += t2 - t1; p.kvMs += performance.now() - t2;
    return out.logits;
  }
}

/** The KV cache of a graph that takes it position-major and returns only the new positions (the wasm graph):
 * one buffer per layer and kind, [capacity, kv, hd], whose first `length` positions are fed as the past without a
 * copy (a view; onnxruntime-web copies it into its heap for the run, as it does any input) and to which each run's
 * new positions are appended. Against the Concat graph, whose whole present comes out of the heap at every step:
 * the heap holds the cache once during a run instead of twice, and only the new positions are copied out. A buffer
 * grows to at least 64 positions and by an eighth at a time (amortised copying, at most ~1/8 unused); rewinding
 * keeps it and only shortens the view. */
export class KvAppendCache {
  constructor(config, float16) {
    this.config = config;
    this.Type = float16 ? Uint16Array : Float32Array;
    this.type = float16 ? "float16" : "float32";
    this.row = config.num_key_value_heads * config.head_dim;      // elements per position
    this.capacity = 0;
    this.buffers = {};
    for (let i = 0; i < config.num_hidden_layers; i++) {
      for (const kind of ["key", "value"]) this.buffers[`${i}.${kind}`] = new this.Type(0);
    }
  }

  /** The past_key_values.* feeds: views of the first `length` positions. */
  feeds(ort, length) {
    const c = this.config, out = {};
    for (const [k, buf] of Object.entries(this.buffers)) {
      out[`past_key_values.${k}`] = new ort.Tensor(this.type, buf.subarray(0, length * this.row),
                                                   [1, length, c.num_key_value_heads, c.head_dim]);
    }
    return out;
  }

  /** Write the run's present.* (its S new positions) after the first `length` positions (read back first when
   * they are GPU buffers: kvOnDevice on WebGPU with this graph). */
  async append(out, length, S) {
    const need = length + S;
    if (need > this.capacity) {
      const cap = Math.max(need, 64, this.capacity + Math.ceil(this.capacity / 8));
      for (const [k, buf] of Object.entries(this.buffers)) {
        const grown = new this.Type(cap * this.row);
        grown.set(buf.subarray(0, length * this.row));
        if (buf.buffer.transfer) buf.buffer.transfer(0);           // free the old bytes now, not at the next GC
        this.buffers[k] = grown;
      }
      this.capacity = cap;
    }
    for (const [k, buf] of Object.entries(this.buffers)) {
      const t = out[`present.${k}`];
      if (!t || t.dims[1] !== S) throw new Error(`present.${k}: expected the ${S} new positions, got [${t && t.dims}]`);
      // the bytes as they are (a float16 output may come as a Float16Array, which set() would convert by value)
      const d = t.location === "cpu" ? t.data : await t.getData();
      buf.set(new this.Type(d.buffer, d.byteOffset, d.byteLength / this.Type.BYTES_PER_ELEMENT), length * this.row);
      if (t.dispose) t.dispose();
    }
  }
}

/** Free a tensor the session no longer needs. A CPU tensor's data (the cache fed as past: onnxruntime-web copied
 * it into its heap for the run, and the run's outputs are new arrays) is detached at once with
 * ArrayBuffer.transfer(0): dispose() alone leaves the bytes to the next garbage collection, and with a cache one
 * position longer at every step the old ones piled up (SmolLM2 int8, 801 positions: see README). */
function release(t) {
  if (t.location === "cpu") {
    const buf = t.data && t.data.buffer;
    if (buf && !(typeof SharedArrayBuffer !== "undefined" && buf instanceof SharedArrayBuffer) && buf.transfer) buf.transfer(0);
  }
  if (t.dispose) t.dispose();
}

function newProfile() { return { calls: 0, runs: 0, feedsMs: 0, runMs: 0, kvMs: 0, logitsMs: 0, topkMs: 0 }; }

/** The k largest values, by (value desc, index asc) — the same order as the Python reference. */
export function topK(values, k) {
  k = Math.min(k, values.length);
  const ids = new Int32Array(k), vals = new Float32Array(k);
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (n === k && !(v > vals[k - 1])) continue;      // ties keep the earlier (lower) index
    let j = n < k ? n++ : k - 1;
    while (j > 0 && vals[j - 1] < v) { vals[j] = vals[j - 1]; ids[j] = ids[j - 1]; j--; }
    vals[j] = v; ids[j] = i;
  }
  return { ids, values: vals };
}
