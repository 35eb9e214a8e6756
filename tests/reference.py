"""A plain numpy Llama forward (tests only): the oracle the ONNX graph is compared against."""
from __future__ import annotations

import numpy as np

from converter.config import LlamaConfig, rope_inv_freq


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, inv_freq):
    """x (heads, S, hd), HF rotate-half convention."""
    freqs = np.outer(pos, inv_freq)                       # (S, hd/2)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def forward(cfg: LlamaConfig, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits (S, V) in float64 for a single sequence, no cache."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    S = len(ids)
    hd, nh, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    inv = np.asarray(rope_inv_freq(cfg), np.float64)
    pos = np.arange(S, dtype=np.float64)
    x = W["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((S, S), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(S, nh, hd).transpose(1, 0, 2)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(S, kv, hd).transpose(1, 0, 2)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(S, kv, hd).transpose(1, 0, 2)
        q, k = rope(q, pos, inv), rope(k, pos, inv)
        k = np.repeat(k, nh // kv, axis=0)
        v = np.repeat(v, nh // kv, axis=0)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        ctx = (att @ v).transpose(1, 0, 2).reshape(S, nh * hd)
        x = x + ctx @ W[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, W["model.norm.weight"], cfg.rms_norm_eps)
    head = W["model.embed_tokens.weight"] if cfg.tie_word_embeddings else W["lm_head.weight"]
    return x @ head.T


def dequantized_weights(checkpoint, scheme: str, embed_scheme: str) -> dict[str, np.ndarray]:
    """What a bundle of `scheme` holds, as float32: each 2-D weight through quantize -> dequantize."""
    from converter.quant import get_scheme
    out = {}
    for name in checkpoint.tensors:
        a = checkpoint.load(name)
        if a.ndim == 2:
            s = get_scheme(embed_scheme if name in ("model.embed_tokens.weight", "lm_head.weight") else scheme)
            a = s.dequantize(s.quantize(a))
        out[name] = a
    return out
