"""(e) llama.cpp native through llama-cpp-python (optional: only when installed) on the same GGUF, same prompt,
same token count, greedy, in its own process.

    python -m bench.llamacpp MODEL.gguf --threads N --prompt TEXT --new-tokens N     (prints one JSON line)
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.child import child_main, run_child

ROOT = Path(__file__).resolve().parent.parent


def probe(model: Path, prompt: str) -> str | None:
    """None when llama-cpp-python is installed and runs this GGUF (two tokens in a child process), else why not.
    A child, because a wheel built for CPU features this machine lacks dies with SIGILL rather than raising."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed (optional: pip install llama-cpp-python)"
    try:
        run(model, 1, prompt, 2, timeout=120)
    except subprocess.TimeoutExpired:
        return "llama-cpp-python did not answer within 120 s"
    except RuntimeError as e:
        return f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} is installed but fails here: {e}"
    return None


def measure(model: str, threads: int, prompt: str, new_tokens: int) -> dict:
    """Prefill = one eval of the whole prompt; decode = eval of one greedy token at a time (argmax of the last
    logits, eos ignored) — the same split as our runtime's forward calls."""
    import numpy as np
    from llama_cpp import Llama

    sys.path.insert(0, str(ROOT))
    from converter.cli import peak_rss_mib

    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
    llm.reset()
    t1 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t1
    tokens = []
    t2 = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(tok)
        if len(tokens) == new_tokens:
            break
        llm.eval([tok])
    decode_s = time.perf_counter() - t2
    return {"load_s": load_s, "prompt_tokens": len(ids), "new_tokens": len(tokens), "threads": threads,
            "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": (len(tokens) - 1) / decode_s if decode_s else None,
            "first_token_ms": 1000 * prefill_s, "tokens": tokens,
            "peak_rss_mib": peak_rss_mib()}


def run(model: Path, threads: int, prompt: str, new_tokens: int, timeout: float = 900) -> dict:
    return run_child("bench.llamacpp", str(model), threads, prompt, new_tokens, timeout)


def main() -> int:
    return child_main(measure, __doc__, "model")


if __name__ == "__main__":
    sys.exit(main())
