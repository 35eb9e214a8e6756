// The only module that touches the QZ decoder (static/wasm/qz.wasm): a pool of workers, one wasm instance each.
// decode(chunk: ArrayBuffer) -> Promise<Uint8Array> (the runtime bytes of that chunk).

export class DecodeError extends Error {
  /** @param {string} name @param {number} code @param {string} where */
  constructor(name, code, where) { super(`${where}: ${name}`); this.code = code; this.codeName = name; }
}

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
      const w = new Worker(new URL("./qz-worker.js", import.meta.url));
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

  /** @param {ArrayBuffer} chunk @param {string} where names the chunk in errors */
  decode(chunk, where = "chunk") {
    return new Promise((resolve, reject) => {
      this.queue.push({ id: this.nextId++, chunk, resolve, reject, where });
      this._pump();
    });
  }

  _pump() {
    while (this.idle.length && this.queue.length) {
      const w = this.idle.pop();
      const job = this.queue.shift();
      this.inflight.set(job.id, job);
      w.postMessage({ id: job.id, chunk: job.chunk }, [job.chunk]);
    }
  }

  _done(worker, msg) {
    const job = this.inflight.get(msg.id);
    this.inflight.delete(msg.id);
    this.idle.push(worker);
    if (msg.error) job.reject(new DecodeError(msg.error, msg.code, job.where));
    else { this.decodeMs += msg.ms; job.resolve(new Uint8Array(msg.out)); }
    this._pump();
  }

  terminate() { for (const w of this.workers) w.terminate(); this.workers = []; }
}
