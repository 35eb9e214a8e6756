// The only module that touches the QZ decoder (static/wasm/qz.wasm): a pool of workers, one wasm instance each.
// decode(chunk: ArrayBuffer) -> Promise<Uint8Array>: the runtime bytes of one chunk, in a new buffer.
// decodeTensor(chunk, target) -> Promise<number>: one chunk of a tensor whose buffers the worker owns until the
//   tensor is complete (qz-worker.js): every chunk of a tensor goes to the same worker, which writes it in place;
//   the finished buffers come back to onTensor(key, {plain, kn}) once, transferred (no copy on this thread, and
//   the page can release them the moment onnxruntime holds its own copy).

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
    this.queue = [];       // pending {id, chunk, resolve, reject, where, worker?, tensor?}
    this.inflight = new Map();
    this.idle = [];        // one entry per free slot (two per worker)
    this.nextId = 1;
    this.decodeMs = 0;
    this.owner = new Map();   // tensor key -> the worker that decodes all of its chunks
    this.load = [];           // output bytes of the tensors given to each worker
    this.onTensor = () => {}; // (key, {plain: ArrayBuffer?, kn: ArrayBuffer?}) when a tensor is complete
  }

  async start() {
    const module = await WebAssembly.compileStreaming(fetch(this.wasmUrl));   // once, shared by every worker
    const ready = [];
    for (let i = 0; i < this.size; i++) {
      const w = new Worker(new URL("./qz-worker.js", import.meta.url), { type: "module" });
      this.workers.push(w);
      this.load.push(0);
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

  /** @param {ArrayBuffer} chunk (transferred to the worker) @param {string} where names the chunk in errors */
  decode(chunk, where = "chunk") {
    return new Promise((resolve, reject) => {
      this.queue.push({ id: this.nextId++, chunk, resolve, reject, where });
      this._pump();
    });
  }

  /** One chunk of a tensor: target = {key, chunks (the tensor's chunk count), nbytes (its plain buffer, 0 for
   * none), kn: {bytes, per, N, K} (its transposed-codes buffer, or null), outOff, bytes (this chunk's decoded
   * size)}. Resolves to the decoded size; a size other than `bytes` writes nothing and resolves to that size
   * (the caller names the mismatch). The tensor's buffers go to onTensor when its last chunk is in.
   * @param {ArrayBuffer} chunk @param {object} target @param {string} where */
  decodeTensor(chunk, target, where = "chunk") {
    let w = this.owner.get(target.key);
    if (w === undefined) {   // the least loaded worker takes the whole tensor
      w = this.load.indexOf(Math.min(...this.load));
      this.load[w] += target.nbytes + (target.kn ? target.kn.bytes : 0);
      this.owner.set(target.key, w);
    }
    return new Promise((resolve, reject) => {
      this.queue.push({ id: this.nextId++, chunk, tensor: target, worker: this.workers[w], resolve, reject, where });
      this._pump();
    });
  }

  _pump() {
    while (this.idle.length && this.queue.length) {
      // the first idle slot whose worker has a job: a job bound to a worker waits for that worker
      const slot = this.idle.findIndex((w) => this.queue.some((j) => !j.worker || j.worker === w));
      if (slot < 0) return;
      const w = this.idle.splice(slot, 1)[0];
      const mine = (j) => !j.worker || j.worker === w;
      const batch = [];
      let bytes = 0;
      for (let i = 0; i < this.queue.length && batch.length < BATCH_CHUNKS;) {
        const job = this.queue[i];
        if (!mine(job) || (batch.length && bytes + job.chunk.byteLength > BATCH_BYTES)) { i++; continue; }
        this.queue.splice(i, 1);
        bytes += job.chunk.byteLength;
        batch.push(job);
      }
      for (const job of batch) this.inflight.set(job.id, job);
      w.postMessage({ batch: batch.map((j) => ({ id: j.id, chunk: j.chunk, tensor: j.tensor })) }, batch.map((j) => j.chunk));
    }
  }

  _done(worker, msg) {
    this.idle.push(worker);
    this.decodeMs += msg.ms;
    for (const r of msg.results) {
      const job = this.inflight.get(r.id);
      this.inflight.delete(r.id);
      if (r.error) { job.reject(new DecodeError(r.error, r.code, job.where)); continue; }
      if (r.complete) this.onTensor(r.complete.key, r.complete);
      job.resolve(r.out ? new Uint8Array(r.out) : r.n);
    }
    this._pump();
  }

  terminate() { for (const w of this.workers) w.terminate(); this.workers = []; }
}
