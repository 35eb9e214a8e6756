"""(a) onnxruntime CPU in Python: the reference path (pure-Python runtime + onnxruntime), one process per
measurement so that peak RSS is that bundle's alone.

    python -m bench.ortcpu BUNDLE --threads N --prompt TEXT --new-tokens N     (prints one JSON line)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.child import child_main, run_child

ROOT = Path(__file__).resolve().parent.parent


def measure(bundle: str, threads: int, prompt: str, new_tokens: int) -> dict:
    """Load the bundle, prefill `prompt` (raw text, the page's tokenization) and decode `new_tokens` greedy
    tokens with eos ignored. Times are session.forward only (runtime/generate.py), like the page's."""
    sys.path.insert(0, str(ROOT))
    from converter.cli import open_chat_model, peak_rss_mib
    from converter.runtime.generate import SamplingConfig, generate

    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    chat = open_chat_model(bundle, threads=threads)
    load_s = time.perf_counter() - t0
    ids = chat.prompt_ids(raw=prompt)
    t1 = time.perf_counter()
    res = generate(chat.session, chat.tokenizer, ids, eos_ids=[], cfg=SamplingConfig(max_new_tokens=new_tokens))
    wall = time.perf_counter() - t1
    return {"load_s": load_s, "prompt_tokens": len(ids), "new_tokens": len(res.token_ids), "threads": threads,
            "prefill_tok_s": res.prefill_tok_s, "decode_tok_s": res.decode_tok_s,
            "first_token_ms": 1000 * res.prefill_seconds,
            "e2e_decode_tok_s": max(len(res.token_ids) - 1, 0) / max(wall - res.prefill_seconds, 1e-9),
            "tokens": res.token_ids, "peak_rss_mib": peak_rss_mib(),
            "imports_rss_mib": rss0}


def run(bundle: Path, threads: int, prompt: str, new_tokens: int, timeout: float = 900) -> dict:
    """One measurement in a fresh process (OpenBLAS pinned to one thread, as in bench/generate.py)."""
    return run_child("bench.ortcpu", str(bundle), threads, prompt, new_tokens, timeout)


def main() -> int:
    return child_main(measure, __doc__, "bundle")


if __name__ == "__main__":
    sys.exit(main())
