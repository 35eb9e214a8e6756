// What Pyodide runs, wherever it runs (the page's main thread, or py-worker.js with ?py=worker): the project's
// own pure-Python runtime (converter/runtime/*.py, served by /py/ from the package: the same files the CPU reference
// path imports) and a small glue module. JavaScript drives the loop; Python tokenizes, renders the chat template,
// samples and detokenizes.
import { loadPyodide } from "/vendor/pyodide/pyodide.mjs";
import { smallerSteps } from "./heap-steps.mjs";

export const RUNTIME_FILES = ["__init__.py", "tokenizer.py", "chat_template.py", "generate.py", "chat.py"];

export const GLUE = `
import json
import os
import pathlib
from converter.runtime.chat import ChatModel
from converter.runtime.generate import Generation, SamplingConfig
# imported now, not at the first reply: compiling the template engine's source takes ~2.5 MB for a moment, which
# Pyodide's fresh heap has free; on top of the tokenizer's tables it made the heap grow (docs/page-bench.md)
import converter.runtime.chat_template

_chat = None
_gen = None

def setup(tok_path, tok_cfg, model_cfg, gen_cfg):
    """tok_path: tokenizer.json, written into Pyodide's file system by the caller (pythonCalls.setup): read from
    there, its text is released once parsed, before the tables are built, and the heap keeps a lower peak."""
    global _chat
    try:
        _chat = ChatModel(pathlib.Path(tok_path), json.loads(tok_cfg or "{}"), json.loads(model_cfg), None,
                          json.loads(gen_cfg) if gen_cfg else None)
    finally:
        os.remove(tok_path)
    return _chat.has_template

def start(messages_json, sampling_json, raw, cached_json):
    """-> JSON {ids: the prompt after what the cache keeps, reused: how many tokens the cache keeps, messages: the
    conversation that fits the context (the oldest turns left out), dropped: how many messages were left out}, or
    {error} for a prompt the runtime refuses (empty, or longer than the context)."""
    global _gen
    s = json.loads(sampling_json)
    raw = raw if isinstance(raw, str) else None          # JS null arrives as pyodide's JsNull, not None
    cfg = SamplingConfig(max_new_tokens=int(s.get("max_new_tokens", 128)), temperature=float(s.get("temperature", 0)),
                         top_k=int(s.get("top_k", 0)), top_p=float(s.get("top_p", 1.0)), seed=int(s.get("seed", 0)),
                         lookahead=int(s.get("lookahead", 0)))
    messages, dropped = None, 0
    if raw is not None:
        ids = _chat.prompt_ids(raw=raw)
    else:
        messages, dropped, ids = _chat.fit_prompt(json.loads(messages_json),
                                                  reserve=min(cfg.max_new_tokens, _chat.context // 2))
    try:
        _gen = Generation(_chat.tokenizer, ids, [] if s.get("ignore_eos") else _chat.eos_ids, cfg,  # bench: fixed length
                          cached=json.loads(cached_json or "[]"), context=_chat.context)
    except ValueError as e:                              # a prompt the runtime refuses: said without a traceback
        return json.dumps({"error": str(e)})
    return json.dumps({"ids": _gen.first_input(), "reused": _gen.reused, "messages": messages, "dropped": dropped})

def push(cand_ids, cand_values, positions=1):
    """The candidates of the last input's final positions (as many as positions says, one position's after
    another) -> JSON {next: the next input ids or null, text, done, reason, tokens: those this step added, rewind:
    cache positions to keep or null, positions: how many the next forward returns, sampled: tokens the model chose
    so far}."""
    ids, values = list(cand_ids.to_py()), list(cand_values.to_py())
    k = len(ids) // positions
    r = _gen.result
    before = len(r.token_ids)
    nxt = _gen.push_positions([(ids[j * k:(j + 1) * k], values[j * k:(j + 1) * k]) for j in range(positions)])
    return json.dumps({"next": nxt, "text": _gen.take_text(), "done": _gen.done, "reason": r.stop_reason,
                       "tokens": r.token_ids[before:], "rewind": _gen.rewind_to, "positions": _gen.positions,
                       "sampled": r.sampled})

def cancel():
    _gen.cancel()
    return _gen.take_text()
`;

/** Start Pyodide with the runtime imported; returns {py, glue, startMs}.
 * heapSteps "5%" (default): its heap (30 MiB as Pyodide's wasm declares it, ~24 MiB of it in use once started)
 * grows by 5 % steps (heap-steps.mjs) instead of Emscripten's 20 %; "20%": Emscripten's (A/B: ?pyheap=20). */
export async function startPython(heapSteps = "5%") {
  const t0 = performance.now();
  const py = await loadPyodide({ indexURL: "/vendor/pyodide/" });
  if (heapSteps !== "20%") smallerSteps(py._module.memory);
  py.FS.mkdirTree("/home/pyodide/converter/runtime");
  py.FS.writeFile("/home/pyodide/converter/__init__.py", "");
  await Promise.all(RUNTIME_FILES.map(async (f) => {
    const res = await fetch(`/py/${f}`);
    if (!res.ok) throw new Error(`/py/${f}: HTTP ${res.status}`);
    py.FS.writeFile(`/home/pyodide/converter/runtime/${f}`, await res.text());
  }));
  py.runPython(`import sys\nsys.path.insert(0, "/home/pyodide")`);
  const glue = py.pyimport("types").ModuleType("glue");
  py.runPython(GLUE, { globals: glue.__dict__ });
  return { py, glue, startMs: performance.now() - t0 };
}

const TOKENIZER_PATH = "/tmp/tokenizer.json";

/** The runtime's calls, on a started Python: the same functions in the worker and on the main thread. */
export function pythonCalls(py, glue) {
  return {
    setup: (tok, tokCfg, modelCfg, genCfg) => {
      py.FS.writeFile(TOKENIZER_PATH, tok);           // the setup reads it from there and deletes it
      return glue.setup(TOKENIZER_PATH, tokCfg, modelCfg, genCfg);
    },
    start: (messagesJson, samplingJson, raw, cachedJson) => glue.start(messagesJson, samplingJson, raw ?? undefined,
                                                                      cachedJson),
    push: (ids, values, positions) => glue.push(ids, values, positions),
    cancel: () => glue.cancel(),
    heapBytes: () => py._module.HEAPU8.length,
  };
}
