"""One frozen LlamaConfig, built once from a Hugging Face config.json or from GGUF metadata, then passed down."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FormatError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.x frequency scaling (`rope_scaling.rope_type == "llama3"`)."""
    factor: float                      # how much longer the context is than the original training context
    low_freq_factor: float             # wavelengths above original/low_freq_factor are divided by `factor`
    high_freq_factor: float            # wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int                   # d_model, e.g. 576 (SmolLM2-135M), 2048 (Llama-3.2-1B)
    num_hidden_layers: int             # number of decoder blocks
    num_attention_heads: int           # query heads
    num_key_value_heads: int           # KV heads (GQA: query heads share them in groups)
    intermediate_size: int             # SwiGLU MLP width
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens (no separate weight)
    head_dim: int = 0                  # 0 means hidden_size // num_attention_heads (filled in __post_init__)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # any of these ends generation (config.json may give a list)
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs.weight: inv_freq[i] /= factor[i]

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // max(1, self.num_attention_heads))
        self.validate()

    # ---- derived fields (the only place they are computed) ----
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        positive = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise FormatError(f"config: {name} must be a positive integer, got {v!r}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise FormatError(f"config: rope_freq_factors has {len(self.rope_freq_factors)} values, "
                              f"expected head_dim/2 = {self.head_dim // 2}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FormatError(f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise FormatError(f"config: head_dim={self.head_dim} must be even for RoPE")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise FormatError(f"config: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise FormatError(f"config: rope_theta must be positive, got {self.rope_theta!r}")

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Inverse of to_dict (the bundle manifest stores the config this way). Unknown keys are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("rope_scaling") is not None:
            kw["rope_scaling"] = RopeScaling(**kw["rope_scaling"])
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids") or ())
        if kw.get("rope_freq_factors") is not None:
            kw["rope_freq_factors"] = tuple(kw["rope_freq_factors"])
        try:
            return cls(**kw)
        except TypeError as e:
            raise FormatError(f"config: {e}") from None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """From a Hugging Face config.json (LlamaForCausalLM, as Llama-3.2 and SmolLM2 ship it)."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type != "llama" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
            raise FormatError(f"{source}: unsupported architecture {archs or model_type!r} "
                              f"(model_type={model_type!r}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise FormatError(f"{source}: missing required field(s) {', '.join(missing)}")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling_from_hf(d.get("rope_scaling"), source),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            head_dim=d.get("head_dim") or 0,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_file(cls, path: Path) -> "LlamaConfig":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: cannot read config: {e}") from None
        if not isinstance(d, dict):
            raise FormatError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, str(path))

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any], tensor_names: set[str], source: str) -> "LlamaConfig":
        """From GGUF metadata (`fields` maps key -> python value). Tied when there is no output.weight."""
        arch = fields.get("general.architecture")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise FormatError(f"{source}: unsupported GGUF architecture {arch!r}; "
                              f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

        def need(key: str):
            if f"llama.{key}" not in fields:
                raise FormatError(f"{source}: GGUF metadata key llama.{key} is missing")
            return fields[f"llama.{key}"]

        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        vocab = fields.get("llama.vocab_size")
        if vocab is None:
            tokens = fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else None
        if vocab is None:
            raise FormatError(f"{source}: cannot tell the vocabulary size (no llama.vocab_size or tokens)")
        scaling = None
        if fields.get("llama.rope.scaling.type") not in (None, "none"):
            raise FormatError(f"{source}: GGUF rope scaling {fields['llama.rope.scaling.type']!r} is not "
                              "supported (llama3 scaling arrives in GGUF as rope_freqs.weight)")
        eos = fields.get("tokenizer.ggml.eos_token_id")
        eot = fields.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(need("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(fields.get("llama.attention.head_count_kv", heads)),
            intermediate_size=int(need("feed_forward_length")),
            vocab_size=int(vocab),
            rms_norm_eps=float(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(fields.get("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            head_dim=int(fields.get("llama.attention.key_length", 0) or 0),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_scaling_from_hf(rs: Any, source: str) -> RopeScaling | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise FormatError(f"{source}: rope_scaling must be an object, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise FormatError(f"{source}: rope_scaling type {kind!r} is not supported; supported: llama3")
    try:
        return RopeScaling(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                           high_freq_factor=float(rs["high_freq_factor"]),
                           original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    except KeyError as e:
        raise FormatError(f"{source}: rope_scaling (llama3) lacks field {e.args[0]}") from None


def rope_inv_freq(cfg: LlamaConfig) -> list[float]:
    """Inverse frequencies per rotary pair (head_dim/2 of them), with llama3 scaling applied when configured.

    Follows the published Llama-3.1 recipe: long wavelengths are slowed by `factor`, short ones kept, and the band
    between is interpolated smoothly.
    """
    d = cfg.head_dim
    inv = [1.0 / (cfg.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    if cfg.rope_freq_factors is not None:  # GGUF stores the llama3 scaling as explicit per-pair divisors
        return [f / k for f, k in zip(inv, cfg.rope_freq_factors)]
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor)
            out.append((1 - smooth) * f / rs.factor + smooth * f)
    return out
