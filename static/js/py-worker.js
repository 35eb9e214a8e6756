// Pyodide in a worker: its start-up (seconds of interpreter initialisation on a cold load) and every call run off
// the page's main thread, which stays free for the download, the decoder pool and onnxruntime-web.
// Message in: {type: "start", heapSteps} then {id, method, args}; out: {type: "ready", startMs} / {type: "ready", error},
// then {id, result} or {id, error}.
import { startPython, pythonCalls } from "./py-glue.js";

let calls = null;

self.onmessage = async (ev) => {
  const msg = ev.data;
  if (msg.type === "start") {
    try {
      const { py, glue, startMs } = await startPython(msg.heapSteps);
      calls = pythonCalls(py, glue);
      self.postMessage({ type: "ready", startMs });
    } catch (e) { self.postMessage({ type: "ready", error: String(e && e.message || e) }); }
    return;
  }
  try { self.postMessage({ id: msg.id, result: calls[msg.method](...msg.args) }); }
  catch (e) { self.postMessage({ id: msg.id, error: String(e && e.message || e) }); }
};
