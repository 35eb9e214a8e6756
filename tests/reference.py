"""A plain numpy Llama forward (tests only): the oracle the ONNX graph is compared against."""
from __future__ import annotations

import json

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


def quantize_activation(x: np.ndarray, block: int) -> np.ndarray:
    """x (S, K) through the graph's symmetric uint8 activation quantization, one scale per `block` values of a row
    (block = K: per row): round-half-even(x / s) * s with s = max|x| / 127 over the block."""
    xb = x.reshape(x.shape[0], -1, block)
    s = np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-12) / 127
    return (np.round(xb / s) * s).reshape(x.shape)


def forward(cfg: LlamaConfig, w: dict[str, np.ndarray], ids: list[int],
            act_blocks: dict[str, int] | None = None) -> np.ndarray:
    """Logits (S, V) in float64 for a single sequence, no cache. act_blocks: weight name -> block size of the
    activation quantization in front of that linear (quantize_activation; absent: float activations)."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    act_blocks = act_blocks or {}

    def mm(h, name):
        if name in act_blocks:
            h = quantize_activation(h, act_blocks[name])
        return h @ W[name].T

    S = len(ids)
    hd, nh, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    inv = np.asarray(rope_inv_freq(cfg), np.float64)
    pos = np.arange(S, dtype=np.float64)
    x = W["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((S, S), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = mm(h, p + "self_attn.q_proj.weight").reshape(S, nh, hd).transpose(1, 0, 2)
        k = mm(h, p + "self_attn.k_proj.weight").reshape(S, kv, hd).transpose(1, 0, 2)
        v = mm(h, p + "self_attn.v_proj.weight").reshape(S, kv, hd).transpose(1, 0, 2)
        q, k = rope(q, pos, inv), rope(k, pos, inv)
        k = np.repeat(k, nh // kv, axis=0)
        v = np.repeat(v, nh // kv, axis=0)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        ctx = (att @ v).transpose(1, 0, 2).reshape(S, nh * hd)
        x = x + mm(ctx, p + "self_attn.o_proj.weight")
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        g = mm(h, p + "mlp.gate_proj.weight")
        u = mm(h, p + "mlp.up_proj.weight")
        x = x + mm(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj.weight")
    x = rms_norm(x, W["model.norm.weight"], cfg.rms_norm_eps)
    return mm(x, "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")


def dequantized_weights(checkpoint, scheme: str, embed_scheme: str) -> dict[str, np.ndarray]:
    """What a bundle of `scheme` holds, as float32: each 2-D weight through quantize -> dequantize."""
    from converter.quant import entropy, get_scheme
    out = {}
    for name in checkpoint.tensors:
        a = checkpoint.load(name)
        if a.ndim == 2:
            vocab = name in ("model.embed_tokens.weight", "lm_head.weight")
            s = get_scheme(embed_scheme if vocab else scheme)
            if vocab and s.target_bits is not None:       # int8-eB weighs vocabulary rows by the token prior
                tok = json.loads(checkpoint.tokenizer_files()["tokenizer.json"])
                q = s.quantize(a, entropy.token_importance(a.shape[0], entropy.special_token_ids(tok)))
            else:
                q = s.quantize(a)
            a = s.dequantize(q)
        out[name] = a
    return out
