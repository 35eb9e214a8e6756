"""The generation loop: prefill once, then one token per step with the KV cache kept by the session.

Pure Python (no numpy): the same file runs in CPython beside onnxruntime and in Pyodide inside the page. The loop
is a small state machine (`Generation`) so that whoever owns the model can drive it — a synchronous CPython loop
(`generate`) or the page's async JavaScript loop around onnxruntime-web:

    gen = Generation(tokenizer, prompt_ids, eos_ids, sampling, cached=session.tokens)
    session.rewind(gen.reused)                 # keep the KV cache of the prompt's first gen.reused tokens
    ids = gen.first_input()                    # the rest of the prompt
    while ids is not None:
        cands = session.forward_positions(ids, gen.positions)   # top candidates of the last gen.positions positions
        ids = gen.push_positions(cands)        # the next input ids, or None when finished
        if gen.rewind_to is not None:
            session.rewind(gen.rewind_to)      # drop the cache of draft tokens the model did not confirm
        text = gen.take_text()                 # newly completed text (UTF-8 safe)

A session returns the TOP_CANDIDATES largest logits of a position, sorted by (logit descending, token id
ascending), so Python never copies the whole vocabulary: greedy takes the first, sampling draws from them.

Lookahead (`SamplingConfig.lookahead`): a step may run the new token followed by up to `lookahead` draft tokens
guessed from the text so far — what followed the latest earlier occurrence of its last two or three tokens
(prompt-lookup decoding). The model's choice at each position is checked against the next draft; every match is
one more token from the same run, and the first mismatch is itself the model's token. Greedy, the output is the
greedy output up to float rounding: a checked position's logits are those of a one-token step but for the order of
some sums, which in a graph that quantizes its activations per token can tip a near-tie, as splitting a prefill
into pieces can. Sampling, a draft is kept with the probability sampling gives it, and otherwise a token is drawn
with the draft left out (`check_draft`): every token keeps its probability, though a seed draws other tokens than
without lookahead. The cache of unconfirmed drafts is dropped (`rewind_to`). A run of 1 + k positions costs little
more than a run of one when the matmuls, not the positions, dominate (onnxruntime-web and SmolLM2:
docs/page-bench.md, session 24).

A chat prompt repeats the whole conversation every turn. The session's KV cache already holds the previous turn's
tokens, so only what follows their common prefix runs (`reusable_prefix`): the prefill of turn n costs the new
message, not the conversation. `context` (the model's max_position_embeddings) bounds prompt + reply.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

TOP_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0            # 0 = greedy
    top_k: int = 0                      # 0 = all TOP_CANDIDATES
    top_p: float = 1.0                  # 1 = no nucleus cut
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    lookahead: int = 0                  # up to this many draft tokens checked per step (module docstring)


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""               # "eos", "stop_string", "max_tokens", "context", "cancelled"
    prompt_tokens: int = 0
    cached_tokens: int = 0              # of the prompt, already in the session's KV cache (not run again)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0               # runs after the prefill
    sampled: int = 0                    # tokens the model chose (an end-of-sequence token included)

    @property
    def prefill_tok_s(self) -> float:
        run = self.prompt_tokens - self.cached_tokens
        return run / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens chosen by the runs after the prefill, per second of them (with lookahead a run may give several)."""
        tokens = self.sampled - 1 if self.sampled else self.decode_steps
        return tokens / self.decode_seconds if self.decode_steps and self.decode_seconds > 0 else 0.0


def top_candidates(logits: Sequence[float], k: int = TOP_CANDIDATES) -> tuple[list[int], list[float]]:
    """Pure-Python reference of what sessions return: the k largest, by (value desc, id asc)."""
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))[:k]
    return order, [float(logits[i]) for i in order]


def sampling_weights(cand_logits: Sequence[float], cfg: SamplingConfig) -> list[float]:
    """The weights sampling draws from, for the leading candidates it keeps: temperature → top-k → top-p
    (normalised before the top-p cut, so they sum to at most 1)."""
    k = min(cfg.top_k, len(cand_logits)) if cfg.top_k > 0 else len(cand_logits)
    top = cand_logits[0]
    weights = [math.exp((cand_logits[j] - top) / cfg.temperature) for j in range(k)]
    total = sum(weights)
    probs = [w / total for w in weights]
    if cfg.top_p < 1.0:
        acc, cut = 0.0, k
        for j, p in enumerate(probs):
            acc += p
            if acc >= cfg.top_p:
                cut = j + 1
                break
        probs = probs[:cut]
    return probs


def _draw(cand_ids: Sequence[int], probs: Sequence[float], rng: random.Random) -> int:
    r = rng.random() * sum(probs)
    last = 0
    for j, p in enumerate(probs):
        if p <= 0:
            continue
        last = j
        r -= p
        if r <= 0:
            return int(cand_ids[j])
    return int(cand_ids[last])


def sample(cand_ids: Sequence[int], cand_logits: Sequence[float], cfg: SamplingConfig, rng: random.Random) -> int:
    """Pick a token from sorted candidates: greedy, or temperature → top-k → top-p with `rng`."""
    if cfg.temperature <= 0:
        return int(cand_ids[0])
    return _draw(cand_ids, sampling_weights(cand_logits, cfg), rng)


def check_draft(cand_ids: Sequence[int], cand_logits: Sequence[float], cfg: SamplingConfig, rng: random.Random,
                draft: int) -> tuple[int, bool]:
    """The token at a position whose input guessed `draft` as the next one: (token, whether it is the draft).
    Greedy: the first candidate. Sampling: speculative sampling with a draft that is certain (its own distribution
    is all on one token): the draft is kept with its probability p(draft), else a token is drawn from p with the
    draft left out — which gives every token exactly its probability p (Leviathan et al. 2023; Chen et al. 2023)."""
    if cfg.temperature <= 0:
        tok = int(cand_ids[0])
        return tok, tok == draft
    probs = sampling_weights(cand_logits, cfg)
    total = sum(probs)
    j = next((j for j in range(len(probs)) if int(cand_ids[j]) == draft), None)
    if j is not None and rng.random() * total < probs[j]:
        return draft, True
    if j is not None:
        probs = list(probs)
        probs[j] = 0.0
        if not any(probs):                 # p(draft) was 1 and the uniform draw fell on its upper edge
            return draft, True
    return _draw(cand_ids, probs, rng), False


class NgramDrafter:
    """Draft tokens for lookahead: the tokens that followed the latest earlier occurrence of the text's last n
    tokens (n = max_n down to min_n). An index from each n-gram to the position after its latest occurrence is kept
    up to date as tokens are added, so a draft costs a few dictionary lookups, not a scan of the text. min_n = 2:
    a single repeated token guesses too often wrong to pay for the positions it adds (SmolLM2's replies to 12 chat
    questions, docs/page-bench.md "Session 24")."""

    def __init__(self, ids: Sequence[int] = (), max_n: int = 3, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n
        self.ids: list[int] = []
        self.after: list[dict] = [{} for _ in range(max_n)]     # after[n-1][n-gram] = index of the token after it
        self.extend(ids)

    def extend(self, ids: Sequence[int]) -> None:
        for t in ids:
            end = len(self.ids)     # the n-grams ending here get their follower, t: index them now
            for n in range(1, min(self.max_n, end) + 1):
                self.after[n - 1][tuple(self.ids[end - n:end])] = end
            self.ids.append(int(t))

    def draft(self, k: int) -> list[int]:
        if k <= 0:
            return []
        end = len(self.ids)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            i = self.after[n - 1].get(tuple(self.ids[end - n:end]))
            if i is not None:
                return self.ids[i:i + k]
        return []


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens of `prompt` a KV cache holding the tokens `cached` (in order) already covers: their
    common prefix, but never the whole prompt — its last token must run to give the first logits."""
    limit = min(len(cached), len(prompt) - 1)
    n = 0
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return n


class Generation:
    """One reply, step by step (see the module docstring).

    cached: the tokens in the session's KV cache (the caller keeps the first `reused` of them and drops the rest);
    context: the most positions the model takes (0 = no limit): a longer prompt is refused, a reply stops there."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], eos_ids: Sequence[int], cfg: SamplingConfig,
                 cached: Sequence[int] = (), context: int = 0):
        from .tokenizer import StreamDecoder

        if not prompt_ids:
            raise ValueError("the prompt is empty: nothing to condition on")
        if context and len(prompt_ids) >= context:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context holds {context}, "
                             f"and the reply needs at least one more")
        self.cfg = cfg
        self.context = context
        self.rng = random.Random(cfg.seed)
        self.eos = set(int(e) for e in eos_ids)
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.reused = reusable_prefix([int(i) for i in cached], self.prompt_ids)
        self.result = GenerationResult(prompt_tokens=len(self.prompt_ids), cached_tokens=self.reused)
        self._stream = StreamDecoder(tokenizer, skip_special_tokens=True)
        self._pending = ""
        self._drafts: list[int] = []         # the draft tokens after the first token of the last input
        self._ran = len(self.prompt_ids)     # cache positions once the first input has run
        self.rewind_to: int | None = None
        self._drafter = NgramDrafter(self.prompt_ids) if cfg.lookahead > 0 else None

    def first_input(self) -> list[int]:
        """The prompt after the part the session's cache already holds."""
        return self.prompt_ids[self.reused:]

    @property
    def done(self) -> bool:
        return bool(self.result.stop_reason)

    def take_text(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def cancel(self) -> None:
        if not self.done:
            self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        self.result.stop_reason = reason
        tail = self._stream.flush()
        if tail and reason != "stop_string":
            self.result.text += tail
            self._pending += tail

    @property
    def positions(self) -> int:
        """How many positions' candidates the next forward must return: the last input's draft tokens + 1."""
        return len(self._drafts) + 1

    def push(self, cand_ids: Sequence[int], cand_logits: Sequence[float]) -> list[int] | None:
        """Feed the model's answer for the last position of the last input (a step without draft tokens); returns
        the next input ids or None when finished."""
        return self.push_positions([(cand_ids, cand_logits)])

    def push_positions(self, cands: Sequence[tuple[Sequence[int], Sequence[float]]]) -> list[int] | None:
        """Feed the model's candidates for the last `positions` positions of the last input, in order; returns the
        next input ids or None when finished. Afterwards `rewind_to` is the number of cache positions to keep when
        the input held drafts the model did not confirm (None: keep them all)."""
        self.rewind_to = None
        if self.done:
            return None
        drafts, self._drafts = self._drafts, []
        if len(cands) != len(drafts) + 1:
            raise ValueError(f"expected the candidates of {len(drafts) + 1} positions, got {len(cands)}")
        res, cfg = self.result, self.cfg
        before = len(res.token_ids)
        for j, (cand_ids, cand_logits) in enumerate(cands):
            if j == len(drafts):                 # the last position: no draft to check
                if not self._take(sample(cand_ids, cand_logits, cfg, self.rng)):
                    return None
                break
            tok, kept = check_draft(cand_ids, cand_logits, cfg, self.rng, drafts[j])
            if not self._take(tok):
                return None
            if not kept:
                break
        keep = len(self.prompt_ids) + len(res.token_ids) - 1      # all but the newest token, the next input
        if keep < self._ran:
            self.rewind_to = self._ran = keep
        tok = res.token_ids[-1]
        if self._drafter is not None:
            self._drafter.extend(res.token_ids[before:])
            self._drafts = self._drafter.draft(self._lookahead())
        nxt = [tok] + self._drafts
        self._ran += len(nxt)
        return nxt

    def _lookahead(self) -> int:
        """Draft tokens the next step may check: never past max_new_tokens or the context."""
        cfg, done = self.cfg, len(self.prompt_ids) + len(self.result.token_ids)
        if cfg.lookahead <= 0:
            return 0
        k = min(cfg.lookahead, cfg.max_new_tokens - len(self.result.token_ids) - 1)
        if self.context:
            k = min(k, self.context - 1 - done)
        return max(k, 0)

    def _take(self, tok: int) -> bool:
        """One token the model chose: stream it and check every stop; False when the reply is finished."""
        res, cfg = self.result, self.cfg
        res.sampled += 1
        if tok in self.eos:
            self._finish("eos")
            return False
        res.token_ids.append(tok)
        piece = self._stream.push(tok)
        if piece:
            res.text += piece
            self._pending += piece
        hit = next((s for s in cfg.stop_strings if s and s in res.text), None)
        if hit is not None:
            cut = res.text.index(hit)
            already = len(res.text) - len(self._pending)      # characters handed out before this step
            res.text = res.text[:cut]
            self._pending = res.text[already:] if cut > already else ""
            self._finish("stop_string")
            return False
        if len(res.token_ids) >= cfg.max_new_tokens:
            self._finish("max_tokens")
            return False
        if self.context and len(self.prompt_ids) + len(res.token_ids) >= self.context:
            self._finish("context")              # the next input would sit past the last position
            return False
        return True


def generate(session, tokenizer, prompt_ids: list[int], eos_ids: Sequence[int], cfg: SamplingConfig,
             on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
             clock: Callable[[], float] = time.perf_counter, context: int = 0,
             reuse: bool = True) -> GenerationResult:
    """Drive a `Generation` with a synchronous session (CPython + onnxruntime). `on_text` receives text pieces
    as they complete; `should_stop()` is polled between tokens (cancellation). reuse: keep the part of the
    session's KV cache that the prompt starts with (sessions with `tokens` and `rewind(n)`; others start over)."""
    cached = session.tokens if reuse and hasattr(session, "rewind") else ()
    gen = Generation(tokenizer, prompt_ids, eos_ids, cfg, cached=cached, context=context)
    if gen.reused:
        session.rewind(gen.reused)
    else:
        session.reset()
    ids = gen.first_input()
    first = True
    while ids is not None:
        if should_stop is not None and should_stop():
            gen.cancel()
            break
        t0 = clock()
        n = gen.positions
        cands = session.forward_positions(ids, n) if n > 1 else [session.forward(ids)]
        dt = clock() - t0
        if first:
            gen.result.prefill_seconds = dt
            first = False
        else:
            gen.result.decode_seconds += dt
            gen.result.decode_steps += 1
        ids = gen.push_positions(cands)
        if gen.rewind_to is not None and ids is not None:
            session.rewind(gen.rewind_to)
        text = gen.take_text()
        if text and on_text is not None:
            on_text(text)
    text = gen.take_text()
    if text and on_text is not None:
        on_text(text)
    return gen.result
