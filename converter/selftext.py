"""Calibration text sampled from the checkpoint's own float model (`--calib-text generated`).

Calibration (GPTQ's Hessians, the embedding's token probabilities) and activation smoothing measure activations on
a text. The default is the end of Python's `pydoc_data.topics`: present on every Python install, but Python
documentation. A model's own samples follow what it says rather than one domain: SmolLM2 int8-e3.15 + int8-e3.5,
smoothed and GPTQ-calibrated, KL over the 10 mixed English / code / JSON texts 0.364 → 0.313 on 4,096 tokens and
0.329 → 0.270 on 12,288 (docs/quality.md, session 19). pydoc stays the default: it needs no float model in memory.

Each window starts at a document boundary (start_ids: Llama 3's <|begin_of_text|>, SmolLM2's <|endoftext|>) and is
sampled at temperature 1 from the float model in onnxruntime, all windows as one batch. Cost: the float model in an
onnxruntime session (SmolLM2: peak RSS 1.4 GB while sampling, 2.6× its float32 weights) and `seq_len` batched
decode steps (SmolLM2, 16 × 256 tokens: ~35 s here). Sampling is seeded, but the logits are onnxruntime's float
arithmetic, so another CPU may sample other tokens.
"""
from __future__ import annotations

import json

import numpy as np

from .errors import QuantError
from .layouts import byte_stream, linear_initializers

TEMPERATURE = 1.0
SEED = 0


class FloatModel:
    """Just enough of a bundle.Bundle for ort_session.OrtDecoder: the f32 graph and its initializers, in memory."""

    def __init__(self, config, weights):
        """weights: a dict name -> float array, or an iterable of (name, array) pairs (read one at a time)."""
        from .onnx_export import export_graph
        from .quant import get_scheme

        self.config = config
        self._arrays = []
        for name, w in (weights.items() if hasattr(weights, "items") else weights):
            inits = [byte_stream(name, w)] if w.ndim == 1 else linear_initializers(name, get_scheme("f32").quantize(w))
            self._arrays += [(i.name, i.symbols.view(np.dtype(i.dtype)).reshape(i.shape)) for i in inits]
        self._graph = export_graph(config, {n: (a.dtype.name, a.shape) for n, a in self._arrays}, "f32", "f32")

    def decode_initializers(self, verify: bool = True):
        for name, a in self._arrays:
            yield {"name": name}, a

    def graph_bytes(self, float16: bool = False, variant: str = "graph") -> bytes:
        if float16 or variant != "graph":
            raise ValueError("FloatModel has only the float32 graph")
        return self._graph


DOCUMENT_STARTS = ("begin_of_text", "endoftext", "end_of_text")   # special tokens that separate documents


def start_ids(checkpoint) -> list[int]:
    """The token every window starts with: a document boundary, i.e. the tokenizer's special token named like a
    beginning of text (Llama 3's <|begin_of_text|>), else like an end of text (SmolLM2's <|endoftext|>, which
    separates its training documents; its configured beginning-of-sequence token is the chat marker <|im_start|>,
    after which it writes chat turns); else the config's beginning-of-sequence id; else its first end-of-sequence
    id (the loaders refuse a checkpoint without one)."""
    cfg = checkpoint.config
    try:
        added = json.loads(checkpoint.tokenizer_files()["tokenizer.json"]).get("added_tokens", [])
    except (KeyError, TypeError, ValueError) as e:
        raise QuantError(f"tokenizer.json: cannot read it for the generated calibration text ({e})") from None
    names = {str(t.get("content", "")).strip("<|>").lower(): int(t["id"]) for t in added
             if t.get("special") and 0 <= int(t.get("id", -1)) < cfg.vocab_size}
    for want in DOCUMENT_STARTS:
        if want in names:
            return [names[want]]
    if cfg.bos_token_id is not None and 0 <= cfg.bos_token_id < cfg.vocab_size:
        return [int(cfg.bos_token_id)]
    if cfg.eos_token_ids:
        return [int(cfg.eos_token_ids[0])]
    raise QuantError("the generated calibration text needs a beginning- or end-of-text token; "
                     "the checkpoint names none")


def generated_ids(checkpoint, sequences: int, seq_len: int, seed: int = SEED,
                  temperature: float = TEMPERATURE) -> tuple[np.ndarray, dict]:
    """(ids (sequences, seq_len) int64, description): windows sampled from the checkpoint's float model."""
    from .ort_session import OrtDecoder

    cfg = checkpoint.config
    first = start_ids(checkpoint)
    if seq_len <= len(first):
        raise QuantError(f"generated calibration windows need more than {len(first)} token(s), got {seq_len}")
    # tensor by tensor: each float tensor is dropped once FloatModel holds its copy
    dec = OrtDecoder(FloatModel(cfg, ((n, checkpoint.load(n)) for n in checkpoint.tensors)))
    rng = np.random.default_rng(seed)
    ids = np.empty((sequences, seq_len), np.int64)
    ids[:, :len(first)] = first
    dec.reset(sequences)
    logits = dec.run(ids[:, :len(first)], last_only=True)[:, -1]
    for t in range(len(first), seq_len):
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max(axis=1, keepdims=True))
        cdf = np.cumsum(p, axis=1)
        u = rng.random(sequences) * cdf[:, -1]
        ids[:, t] = np.minimum((cdf < u[:, None]).sum(axis=1), cfg.vocab_size - 1)
        if t + 1 < seq_len:
            logits = dec.run(ids[:, t:t + 1], last_only=True)[:, -1]
    del dec
    return ids, {"corpus": "generated", "start_ids": first, "seed": seed, "temperature": temperature,
                 "tokens": int(ids.size)}
