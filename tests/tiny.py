"""Tiny random Llama-3.2-shaped checkpoints, written in both formats, for tests (no downloads, seconds to make).

Layout mirrors Llama-3.2: GQA, llama3 rope scaling, tied embeddings (1B/3B tie them), bf16 safetensors, a
byte-level BPE tokenizer with ChatML-style special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=384, head_dim=32, rms_norm_eps=1e-5, rope_theta=500000.0,
            max_position_embeddings=512)

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_tokenizer(vocab_size: int = TINY["vocab_size"]) -> tuple[dict, dict]:
    """A byte-level BPE tokenizer.json (+ tokenizer_config) of exactly vocab_size entries: 256 bytes, merges of
    common English pairs, then the special tokens at the end."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = []
    text = "the quick brown fox jumps over the lazy dog. hello world, this is a test of the tiny tokenizer " * 4
    words = [[b2u[b] for b in (" " + w).encode()] for w in text.split()]
    n_merges = vocab_size - 256 - len(SPECIALS)
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + 1
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab[a + b] = len(vocab)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    while len(vocab) < vocab_size - len(SPECIALS):   # pad with unused filler tokens if merges ran out
        vocab[f"<|filler_{len(vocab)}|>"] = len(vocab)
    added = []
    for s in SPECIALS:
        added.append({"id": len(vocab), "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
        vocab[s] = len(vocab)
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    tok_cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT_TEMPLATE,
               "add_bos_token": False}
    return tok, tok_cfg


def tiny_weights(cfg: dict, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights with realistic scales (std 0.02, norms near 1)."""
    rng = np.random.default_rng(seed)
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd, nh, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    norm = lambda: (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": (rng.standard_normal((V, H)) * 0.08).astype(np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, H)
        t[p + "self_attn.k_proj.weight"] = w(kv * hd, H)
        t[p + "self_attn.v_proj.weight"] = w(kv * hd, H)
        t[p + "self_attn.o_proj.weight"] = w(H, nh * hd)
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "mlp.gate_proj.weight"] = w(I, H)
        t[p + "mlp.up_proj.weight"] = w(I, H)
        t[p + "mlp.down_proj.weight"] = w(H, I)
    t["model.norm.weight"] = norm()
    if not tied:
        t["lm_head.weight"] = w(V, H)
    return t


def hf_config(cfg: dict, tied: bool, rope_scaling: bool = True) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **cfg, "tie_word_embeddings": tied,
         "bos_token_id": cfg["vocab_size"] - 4, "eos_token_id": [cfg["vocab_size"] - 3],
         "torch_dtype": "bfloat16", "hidden_act": "silu"}
    if rope_scaling:
        d["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}
    return d


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even), as uint16."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def write_hf(folder: Path, cfg: dict = TINY, tied: bool = True, dtype: str = "bf16", shards: int = 1,
             seed: int = 0, rope_scaling: bool = True) -> dict[str, np.ndarray]:
    """Write a HF folder; returns the float32 weights exactly as stored (bf16-rounded when dtype is bf16)."""
    import ml_dtypes  # noqa: F401  (bf16 dtype registration for safetensors' numpy writer)
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(cfg, tied, seed)
    stored, arrays = {}, {}
    for n, a in weights.items():
        if dtype == "bf16":
            bits = to_bf16_bits(a)
            arrays[n] = bits.view(ml_dtypes.bfloat16)
            stored[n] = from_bf16_bits(bits)
        elif dtype == "f16":
            arrays[n] = a.astype(np.float16)
            stored[n] = arrays[n].astype(np.float32)
        else:
            arrays[n] = a
            stored[n] = a
    names = list(arrays)
    if shards == 1:
        save_file(arrays, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: arrays[n] for n in part}, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, tied, rope_scaling)))
    tok, tok_cfg = tiny_tokenizer(cfg["vocab_size"])
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [cfg["vocab_size"] - 3]}))
    return stored


def permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (HF rotate-half rows -> interleaved pairs); the loader undoes it."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path: Path, weights: dict[str, np.ndarray], cfg: dict = TINY, tied: bool = True,
               quant: dict[str, str] | None = None) -> None:
    """Write a llama GGUF with the same weights (q/k permuted like llama.cpp); `quant` maps GGUF tensor names to
    "Q8_0" / "Q4_0" / "Q4_1" (others F32)."""
    import gguf

    quant = quant or {}
    w = gguf.GGUFWriter(str(path), "llama")
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    w.add_block_count(L)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    tok, tok_cfg = tiny_tokenizer(cfg["vocab_size"])
    id_to_tok = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")            # the tiny tokenizer pre-tokenizes with the GPT-2 regex
    w.add_token_list([t for t, _ in id_to_tok])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in id_to_tok])
    w.add_token_merges(tok["model"]["merges"])
    w.add_bos_token_id(tok["model"]["vocab"]["<|begin_of_text|>"])
    w.add_eos_token_id(tok["model"]["vocab"]["<|eot_id|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])
    inv = {}
    from converter.loaders import GGUF_NAME_MAP, _map_name
    for g_name in GGUF_NAME_MAP:
        for i in range(L) if "{i}" in g_name else [None]:
            gn = g_name.replace("{i}", str(i)) if i is not None else g_name
            hf = _map_name(GGUF_NAME_MAP, gn)
            if hf in weights:
                inv[hf] = gn
    for hf, a in weights.items():
        gn = inv[hf]
        if hf.endswith("q_proj.weight"):
            a = permute_for_gguf(a, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            a = permute_for_gguf(a, cfg["num_key_value_heads"])
        qt = quant.get(gn)
        if qt:
            ttype = getattr(gguf.GGMLQuantizationType, qt)
            data = gguf.quants.quantize(a, ttype)
            w.add_tensor(gn, data, raw_shape=data.shape, raw_dtype=ttype)
        else:
            w.add_tensor(gn, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
