"""Model-side scores over an OrtDecoder (onnxruntime CPU): KL against a baseline, perplexity, multiple choice.

Shapes: S = tokens of one sequence, V = vocabulary.
Everything numeric is accumulated in float64; logits arrive as float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .data import EvalError, McPrompt

Z95 = 1.959963984540054          # two-sided 95% normal quantile


# ---------------------------------------------------------------------------------------------------------------
# Softmax helpers
# ---------------------------------------------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> float64 log-probabilities over the last axis."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits [S, V], targets [S] -> -log P(target) [S], without materialising the [S, V] float64 log-softmax."""
    m = logits.max(axis=-1)                                                    # [S]
    lse = m.astype(np.float64) + np.log(np.exp(logits - m[:, None]).sum(axis=-1, dtype=np.float64))
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# KL(baseline ‖ candidate) and top-1 agreement, position by position over the same token ids
# ---------------------------------------------------------------------------------------------------------------

def reference_logprobs(dec, ids: list[int]) -> np.ndarray:
    """The baseline's log-probabilities at every position of one text: [S, V] float32 (kept for the candidates)."""
    return log_softmax(dec.forward_full(ids)).astype(np.float32)


def kl_per_token(ref_logprobs: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ref [S, V] log P, candidate logits [S, V] -> (KL(P ‖ Q) per position [S], top-1 agreement per position [S])."""
    # both sides rounded to float32 the same way, so a bundle against itself gives exactly 0
    lp = ref_logprobs.astype(np.float64)
    lq = log_softmax(logits).astype(np.float32).astype(np.float64)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    agree = ref_logprobs.argmax(axis=-1) == logits.argmax(axis=-1)
    return kl, agree


# ---------------------------------------------------------------------------------------------------------------
# Perplexity: each chunk is one forward pass; its first token is context, the other S - 1 are scored
# ---------------------------------------------------------------------------------------------------------------

def chunk_nll(dec, chunk: list[int]) -> tuple[float, int]:
    """(sum of -log P(token | previous tokens of the chunk), number of scored tokens)."""
    logits = dec.forward_full(chunk)                                           # [S, V]
    nll = token_nll(logits[:-1], np.asarray(chunk[1:], np.int64))
    return float(nll.sum()), len(chunk) - 1


# ---------------------------------------------------------------------------------------------------------------
# Continuation log-likelihoods
#
# Every scored sequence is one forward pass from an empty cache, batch 1 — the way the runtime prefills a prompt.
# Neither batching nor a shared KV prefix is used: int8 and ternary linears (DynamicQuantizeMatMul) quantize
# their input activations with ONE scale per call, so a row's logits would change with the padding and the other
# rows in its batch, or with where a cached prefix was cut (measured on SmolLM2 int8: several nats per answer).
# Identical sequences run once, so single-token letters (" A".." D") share one pass: their scores are the
# letter logits at the last position.
# ---------------------------------------------------------------------------------------------------------------

def continuation_logprobs(dec, requests: list[tuple[list[int], list[int]]]) -> list[float]:
    """For each (context, continuation): sum of log P(continuation tokens | context)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, cont) in enumerate(requests):
        if not context or not cont:
            raise EvalError("a multiple-choice context or answer encoded to no tokens")
        groups.setdefault((*context, *cont[:-1]), []).append(i)
    out = [0.0] * len(requests)
    for seq, members in groups.items():
        logits = dec.forward_full(list(seq))                                   # [S, V]
        for i in members:
            context, cont = requests[i]
            pos = np.arange(len(context) - 1, len(context) - 1 + len(cont))   # position k predicts token k + 1
            out[i] = float(-token_nll(logits[pos], np.asarray(cont, np.int64)).sum())
    return out


@dataclass(frozen=True)
class McTokens:
    """A multiple-choice prompt as token ids (see data.mc_prompt for the text)."""
    letter_context: list[int]
    letters: list[list[int]]
    cloze_context: list[int]
    answers: list[list[int]]
    answer_chars: list[int]      # characters of each " answer" text: the acc_norm divisor


def encode_mc(tokenizer, p: McPrompt) -> McTokens:
    ctx = lambda s: tokenizer.encode(s, add_special_tokens=True)  # noqa: E731
    cont = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    return McTokens(letter_context=ctx(p.letter_context), letters=[cont(x) for x in p.letters],
                    cloze_context=ctx(p.cloze_context), answers=[cont(a) for a in p.answers],
                    answer_chars=[len(a) for a in p.answers])


def score_mc(dec, t: McTokens) -> tuple[list[float], list[float]]:
    """(letter scores, length-normalised answer scores), one per choice; the answer is the argmax of each.

    letter: log P(" A" | prompt listing the choices + "Answer:") — with single-token letters, the letter logits.
    cloze:  log P(" answer text" | question + "Answer:") / characters of " answer text" (lm-eval-harness acc_norm).
    """
    n = len(t.letters)
    lp = continuation_logprobs(dec, [(t.letter_context, x) for x in t.letters] +
                               [(t.cloze_context, a) for a in t.answers])
    return lp[:n], [lp[n + i] / t.answer_chars[i] for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)
