// The only module that touches the QZ decoder (static/wasm/qz.wasm): a pool of workers, one wasm instance each.
// decode(chunk: ArrayBuffer) -> Promise<Uint8Array> (the runtime bytes of that chunk);
// decodeInto(chunk, {bytes, dst, kn}) -> Promise<number>: the bytes go straight to their places in views of
// SharedArrayBuffers, written by the worker (needs a cross-origin isolated page, see DecoderPool.canDecodeInto).

export class DecodeError extends Error {
  /** @param {string} name @param {number} code @param {string} where */
  constructor(name, code, where) { super(`${where}: ${name}`); this.code = code; this.codeName = name; }
}

// Chunks queued together go to a worker in one message, up to BATCH_CHUNKS of them and BATCH_BYTES of input: a
// 2-bit chunk decodes in ~0.2 ms, the order of a message round trip, so one message per chunk left the worker idle.
const BATCH_CHUNKS = 8;
const BATCH_BYTES = 1 << 20;

export class DecoderPool {
  /** @param {number} size workers (default: one per core) */
  constructor(size = navigator.hardwareConcurrency || 2, wasmUrl = "/static/wasm/qz.wasm") {
    this.size = Math.max(1, size);
    this.wasmUrl = new URL(wasmUrl, location.href).href;
    this.workers = [];
    this.queue = [];       // pending {id, chunk, resolve, reject, where}
    this.inflight = new Map();
    this.idle = [];        // one entry per free slot (two per worker)
    this.nextId = 1;
    this.decodeMs = 0;
  }

  async start() {
    const module = await WebAssembly.compileStreaming(fetch(this.wasmUrl));   // once, shared by every worker
    const ready = [];
    for (let i = 0; i < this.size; i++) {
      const w = new Worker(new URL("./qz-worker.js", import.meta.url), { type: "module" });
      this.workers.push(w);
      ready.push(new Promise((resolve, reject) => {
        w.onmessage = (ev) => {
          if (ev.data.type === "ready") {
            if (ev.data.error) reject(new Error(`qz.wasm failed to load: ${ev.data.error}`));
            else { w.onmessage = (e) => this._done(w, e.data); resolve(); }
          }
        };
      }));
      w.postMessage({ type: "init", module });
      // two slots per worker: the next chunk is already queued in the worker when one finishes
      this.idle.push(w, w);
    }
    await Promise.all(ready);
  }

  /** Whether decodeInto can be used: SharedArrayBuffer exists only on cross-origin isolated pages. */
  static get canDecodeInto() { return typeof SharedArrayBuffer !== "undefined" && self.crossOriginIsolated === true; }

  /** @param {ArrayBuffer} chunk (transferred to the worker) @param {string} where names the chunk in errors */
  decode(chunk, where = "chunk") {
    return new Promise((resolve, reject) => {
      this.queue.push({ id: this.nextId++, chunk, resolve, reject, where });
      this._pump();
    });
  }

  /** Decode a chunk of `bytes` decoded bytes into views of SharedArrayBuffers: dst (a Uint8Array of `bytes`
   * bytes) gets them as they are, kn = {dst, per, N, K, outOff} the codes transposed (qz-worker.js says how).
   * Resolves to the decoded size; a size other than `bytes` writes nothing and resolves to that size (the caller
   * names the mismatch). @param {ArrayBuffer} chunk @param {{bytes: number, dst?: Uint8Array, kn?: object}} into
   * @param {string} where */
  decodeInto(chunk, into, where = "chunk") {
    for (const v of [into.dst, into.kn?.dst]) {
      if (v && !(v.buffer instanceof SharedArrayBuffer)) throw new TypeError(`${where}: decodeInto writes only to views of a SharedArrayBuffer`);
    }
    if (into.dst && into.dst.length !== into.bytes) throw new RangeError(`${where}: dst holds ${into.dst.length} bytes, not ${into.bytes}`);
    return new Promise((resolve, reject) => {
      this.queue.push({ id: this.nextId++, chunk, into, resolve, reject, where });
      this._pump();
    });
  }

  _pump() {
    while (this.idle.length && this.queue.length) {
      const w = this.idle.pop();
      const batch = [this.queue.shift()];
      let bytes = batch[0].chunk.byteLength;
      while (this.queue.length && batch.length < BATCH_CHUNKS && bytes + this.queue[0].chunk.byteLength <= BATCH_BYTES) {
        const job = this.queue.shift();
        bytes += job.chunk.byteLength;
        batch.push(job);
      }
      for (const job of batch) this.inflight.set(job.id, job);
      w.postMessage({ batch: batch.map((j) => ({ id: j.id, chunk: j.chunk, into: j.into })) }, batch.map((j) => j.chunk));
    }
  }

  _done(worker, msg) {
    this.idle.push(worker);
    this.decodeMs += msg.ms;
    for (const r of msg.results) {
      const job = this.inflight.get(r.id);
      this.inflight.delete(r.id);
      if (r.error) job.reject(new DecodeError(r.error, r.code, job.where));
      else job.resolve(r.out ? new Uint8Array(r.out) : r.n);
    }
    this._pump();
  }

  terminate() { for (const w of this.workers) w.terminate(); this.workers = []; }
}
