// The page's handle on the Python runtime (py-glue.js): Pyodide on the main thread (default), or in a worker
// (py-worker.js, ?py=worker), where its start-up does not hold the main thread while the bundle downloads and
// onnxruntime-web creates its session — worth it on a device with cores to spare (not on this 2-core machine).
// Every call is async either way.
import { startPython, pythonCalls } from "./py-glue.js";

export class PyRuntime {
  /** @param {"worker"|"main"} where @param {string} heapSteps py-glue.js startPython */
  static async start(where = "main", heapSteps = "5%") {
    if (where === "main") {
      const { py, glue, startMs } = await startPython(heapSteps);
      const calls = pythonCalls(py, glue);
      return new PyRuntime((method, args) => Promise.resolve(calls[method](...args)), startMs, "main");
    }
    const worker = new Worker(new URL("./py-worker.js", import.meta.url), { type: "module" });
    const pending = new Map();
    let nextId = 1;
    const startMs = await new Promise((resolve, reject) => {
      worker.onmessage = (ev) => {
        if (ev.data.type !== "ready") return;
        if (ev.data.error) { reject(new Error(ev.data.error)); return; }
        worker.onmessage = (e) => {
          const p = pending.get(e.data.id);
          pending.delete(e.data.id);
          if (e.data.error !== undefined) p.reject(new Error(e.data.error)); else p.resolve(e.data.result);
        };
        resolve(ev.data.startMs);
      };
      worker.onerror = (e) => reject(new Error(`Python worker failed: ${e.message || "script error"}`));
      worker.postMessage({ type: "start", heapSteps });
    });
    const call = (method, args) => new Promise((resolve, reject) => {
      const id = nextId++;
      pending.set(id, { resolve, reject });
      worker.postMessage({ id, method, args });
    });
    return new PyRuntime(call, startMs, "worker");
  }

  constructor(call, startMs, where) { this.call = call; this.startMs = startMs; this.where = where; }

  setup(tokenizer, manifest) {
    return this.call("setup", [tokenizer["tokenizer.json"], tokenizer["tokenizer_config.json"] || "",
                               JSON.stringify(manifest.config), tokenizer["generation_config.json"] || ""]);
  }

  /** @param {number[]} cached the tokens in the session's KV cache
   * @returns {Promise<{ids: number[], reused: number, messages: object[]|null, dropped: number}>} the prompt ids to
   *   run after the first `reused` cached tokens; messages: the conversation cut to the context (dropped: how many
   *   of the oldest messages were left out), null for a raw prompt */
  async start(messages, sampling, raw = null, cached = []) {
    const r = JSON.parse(await this.call("start", [JSON.stringify(messages), JSON.stringify(sampling), raw,
                                                     JSON.stringify(Array.from(cached))]));
    if (r.error) throw new Error(r.error);
    return r;
  }

  /** @param {{ids: Int32Array, values: Float32Array, positions?: number}} cand the candidates of the last positions
   * @returns {Promise<{next: number[]|null, text: string, done: boolean, reason: string, tokens: number[],
   *   rewind: number|null, positions: number, sampled: number}>} py-glue.js push */
  async push(cand) { return JSON.parse(await this.call("push", [cand.ids, cand.values, cand.positions || 1])); }

  cancel() { return this.call("cancel", []); }

  /** Bytes of Pyodide's wasm heap (bench/). */
  heapBytes() { return this.call("heapBytes", []); }
}
