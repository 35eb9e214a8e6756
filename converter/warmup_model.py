"""The warm-up model a bundle carries for the page (folder `warmup/` of the bundle, manifest key "warmup").

Why: on a first visit V8 runs onnxruntime-web's wasm in its baseline tier and recompiles the hot functions with
its optimizing compiler in the background while they run. Without help that happens during the first reply:
SmolLM2 int4-m32's first ~30 decode steps at 2 threads took 40–60 ms instead of ~20 (docs/page-bench.md, session
25). The optimized code belongs to the compiled module, not to a session, so any session of the same onnxruntime-web
build that calls the same kernels brings it about. This model is such a session, a few dozen kilobytes: one
decoder layer of random weights, quantized with the bundle's own schemes and exported as the same graphs by the
same code, with the bundle's head size, RoPE and KV-cache layout; only its widths, depth and vocabulary are small.
The page (static/js/app.js, proxyWarmUp) runs it while the real weights download and decode, and drops it before the
real session is made (session 26: int4-m32's first reply at 2 threads 23–26 -> 35–48 tok/s after 120 such steps).

It is built as a bundle of its own, by write_bundle's own code, so the page loads it with the loader it loads any
bundle with; converter.bundle.load checks it, whole, as part of the bundle it belongs to.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .loaders import Checkpoint, SourceTensor, expected_shapes

DIR = "warmup"          # the folder inside the bundle
HIDDEN = 128            # a multiple of every scheme's group size, and of the head sizes Llama models use (64, 128)
VOCAB = 256             # one token per byte: the tokenizer below
POSITIONS = 256         # the context the page's warm-up loop stays within (and the RoPE table's length)


def warmup_config(cfg: LlamaConfig) -> LlamaConfig:
    """cfg's head size, query heads per KV head, RoPE and norm epsilon on one layer HIDDEN wide."""
    hd = cfg.head_dim if HIDDEN % cfg.head_dim == 0 else HIDDEN
    heads = HIDDEN // hd
    kv = heads // cfg.group_size if heads % cfg.group_size == 0 else 1
    return dataclasses.replace(cfg, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=heads,
                               num_key_value_heads=max(kv, 1), intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                               head_dim=hd, max_position_embeddings=min(cfg.max_position_embeddings, POSITIONS),
                               bos_token_id=0, eos_token_ids=(0,))


def byte_tokenizer() -> dict[str, bytes]:
    """A byte-level BPE tokenizer.json of VOCAB tokens (one per byte, no merges) and its tokenizer_config.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {chars[b]: b for b in range(256)}, "merges": []}}
    return {"tokenizer.json": json.dumps(tok, ensure_ascii=False).encode("utf-8"),
            "tokenizer_config.json": b'{"add_bos_token": false}'}


class WarmupCheckpoint(Checkpoint):
    """Random weights (seeded: every build of a bundle writes the same warm-up model) of warmup_config(the
    checkpoint's config); its manifest names the checkpoint as its source."""

    def __init__(self, source: Checkpoint, seed: int = 0):
        self.config = warmup_config(source.config)
        self.path, self.kind = source.path, source.kind
        shapes = expected_shapes(self.config)
        self.tensors = {n: SourceTensor(n, n, self.path, s, "F32") for n, s in shapes.items()}
        # weights of three values, mostly 0: the kernels do the same work whatever the values (no sparse paths), and
        # the codes' low entropy keeps the folder small (Gaussian weights made it 127 KB for int4-m32, 197 KB for
        # int8)
        rng = np.random.default_rng(seed)
        self._weights = {n: (np.ones(s, np.float32) if len(s) == 1 else
                             rng.choice(np.float32([-0.05, 0, 0.05]), size=s, p=[0.1, 0.8, 0.1]))
                         for n, s in shapes.items()}

    def load(self, name: str) -> np.ndarray:
        return self._weights[name].copy()

    def tokenizer_files(self) -> dict[str, bytes]:
        return byte_tokenizer()
