"""The generation loop: prefill once, then one token per step with the KV cache kept by the session.

Pure Python (no numpy): the same file runs in CPython beside onnxruntime and in Pyodide inside the page, where
the session is a thin JS object around onnxruntime-web. A session only has to provide:

    session.reset()                      forget the KV cache
    session.forward(ids: list[int])      run these new tokens after what is cached; return the logits of the
                                         last position as a sequence of floats (len = vocab)

Sampling: greedy when temperature == 0, else temperature → top-k → top-p (nucleus) with a seeded RNG, so a run
is reproducible from its seed.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0            # 0 = greedy
    top_k: int = 0                      # 0 = no top-k cut
    top_p: float = 1.0                  # 1 = no nucleus cut
    seed: int = 0
    stop_strings: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""               # "eos", "stop_string", "max_tokens", "cancelled"
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1      # the first token comes out of prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def argmax(logits: Sequence[float]) -> int:
    best, best_i = -math.inf, 0
    for i, v in enumerate(logits):
        if v > best:
            best, best_i = v, i
    return best_i


def sample(logits: Sequence[float], cfg: SamplingConfig, rng: random.Random) -> int:
    if cfg.temperature <= 0:
        return argmax(logits)
    k = cfg.top_k if cfg.top_k > 0 else 256      # a finite candidate set keeps the pure-Python cost bounded
    cand = sorted(range(len(logits)), key=logits.__getitem__, reverse=True)[:k]
    t = cfg.temperature
    top = logits[cand[0]]
    weights = [math.exp((logits[i] - top) / t) for i in cand]
    total = sum(weights)
    probs = [w / total for w in weights]
    if cfg.top_p < 1.0:
        acc, cut = 0.0, len(probs)
        for j, p in enumerate(probs):
            acc += p
            if acc >= cfg.top_p:
                cut = j + 1
                break
        cand, probs = cand[:cut], probs[:cut]
    r = rng.random() * sum(probs)
    for i, p in zip(cand, probs):
        r -= p
        if r <= 0:
            return i
    return cand[-1]


def generate(session, tokenizer, prompt_ids: list[int], eos_ids: Sequence[int], cfg: SamplingConfig,
             on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
             clock: Callable[[], float] = time.perf_counter) -> GenerationResult:
    """Generate from `prompt_ids`; `on_text` receives decoded text pieces as they complete (UTF-8 safe);
    `should_stop()` is polled between tokens (cancellation)."""
    from .tokenizer import StreamDecoder

    rng = random.Random(cfg.seed)
    res = GenerationResult(prompt_tokens=len(prompt_ids))
    stream = StreamDecoder(tokenizer, skip_special_tokens=True)
    eos = set(eos_ids)
    session.reset()
    t0 = clock()
    logits = session.forward(list(prompt_ids))
    res.prefill_seconds = clock() - t0
    t1 = clock()
    while True:
        if should_stop is not None and should_stop():
            res.stop_reason = "cancelled"
            break
        tok = sample(logits, cfg, rng)
        if tok in eos:
            res.stop_reason = "eos"
            break
        res.token_ids.append(tok)
        piece = stream.push(tok)
        if piece:
            res.text += piece
            if on_text is not None:
                on_text(piece)
        hit = next((s for s in cfg.stop_strings if s and s in res.text), None)
        if hit is not None:
            res.text = res.text[:res.text.index(hit)]
            res.stop_reason = "stop_string"
            break
        if len(res.token_ids) >= cfg.max_new_tokens:
            res.stop_reason = "max_tokens"
            break
        logits = session.forward([tok])
    tail = stream.flush()
    if tail and res.stop_reason != "stop_string":
        res.text += tail
        if on_text is not None:
            on_text(tail)
    res.decode_seconds = clock() - t1
    return res
