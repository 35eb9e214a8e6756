"""The bundle: a folder any static HTTP server can host.

    bundle/
      manifest.json          format name + version, config, files with sizes and SHA-256, blobs, totals
      tables.json[.zlib]     the tensors and the initializers with their chunk tables (version 2: most of what a
                             manifest held; SmolLM2: a 353 KB manifest → 2.5 KB + 28 KB of tables as zlib)
      model.onnx[.zlib]      decoder graph; every initializer is external data (location = its own name)
      weights-000.qzb ...    blobs: concatenated QZ chunks (docs/lzw-format.md), at most `blob_bytes` each
      tokenizer.json[.zlib], tokenizer_config.json (and generation_config.json when the source had one)
      warmup/                with model.wasm.onnx: the warm-up model the page runs while the weights load, a bundle of
                             its own (~45 KB; converter/warmup_model.py), listed and checked by this manifest

Files from 64 KiB up are stored compressed when that saves 10%: version 3 writes one zlib stream (`fname.zlib`,
"deflate" in the manifest entry); version 2 wrote QZ chunks (`fname.qz`, "qz"), which are still read (_write_file).

`write_bundle` streams: one tensor is loaded, quantized, laid out and encoded before the next is read. It writes
into a temporary sibling folder and renames it at the end, so a crash never leaves something that looks like a
bundle. `load` validates every field it reads and raises BundleError naming the file and field/offset.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, codec, lzw
from .config import LlamaConfig
from .errors import BundleError, CodecError, TinyQMoEError
from .layouts import (KN_SUFFIX, LAYER_PIECE_MAX, LAYER_PIECE_MIN_WEIGHTS, LAYOUT_BITS, PIECES_SUFFIX, VOCAB_CODES,
                      Initializer, byte_stream, family, group_table_codes, group_table_shape, block_scale_parts,
                      kn_shape, linear_initializers, multiplied_parts, multiplied_shape, piece_width, pieces_shape)
from .quant import entropy, errors, get_scheme, quantize_rows
from .smooth import row_relative
from .runtime.tokenizer import pack as tokenizer_pack, unpack as tokenizer_unpack

FORMAT_NAME = "tiny-qmoe-bundle"
DEFLATE_SUFFIX = ".zlib"     # not ".z": some servers map .Z to Content-Encoding: compress
STORED_FORMS = ("qz", "deflate")   # how a graph, tokenizer or tables file may be stored besides as is
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # version 1 kept "tensors" and "initializers" inline in manifest.json; version 3 may
                               # store the graph, tokenizer and tables files as deflate streams (_write_file)
MANIFEST = "manifest.json"
TABLES = "tables.json"
GRAPH = "model.onnx"
GRAPH_FP16 = "model.fp16.onnx"  # the same graph with float16 activations and KV cache (WebGPU with shader-f16)
GRAPH_WASM = "model.wasm.onnx"  # group schemes as batched integer GEMMs instead of MatMulNBits (the WASM EP)
# the optional graph variants: manifest key -> file. model.onnx's initializers (the wasm graph reads some of them
# transposed: graph_initializers), other ops.
GRAPH_VARIANTS = {"graph_fp16": GRAPH_FP16, "graph_wasm": GRAPH_WASM}
DEFAULT_CHUNK_SYMBOLS = 1 << 18        # 262,144 symbols: big enough for LZW to learn, small enough to parallelise
DEFAULT_BLOB_BYTES = 64 << 20          # split blobs so downloads can run in parallel and caches stay happy
MAX_INITIALIZER_BYTES = (2 << 30) - 1  # browsers cap one ArrayBuffer at 2 GB
METHOD_NAMES = {lzw.METHOD_PACKED: "packed", lzw.METHOD_LZW: "lzw"}


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class BuildOptions:
    scheme: str = "int8"
    embed_scheme: str | None = None          # None: "int8" (per channel) for quantized schemes, else the same float
    chunk_symbols: int = DEFAULT_CHUNK_SYMBOLS
    blob_bytes: int = DEFAULT_BLOB_BYTES
    max_code_bits: int = 16
    force: bool = False
    name: str | None = None
    calibration: Any = None                  # calibrate.CalibrationOptions: GPTQ / clip search / mixed precision
    smooth: float | str | None = None        # activation smoothing (converter/smooth.py): an alpha, "auto" (a
                                             # search per layer group), "on" (the scheme's best: auto for int4,
                                             # 0.5 for int8), "off", or None: the scheme's default (resolve_smooth)
    fp16_graph: bool = True                  # also write model.fp16.onnx (same weights, float16 activations)
    wasm_graph: bool = True                  # also write model.wasm.onnx when a tensor uses a group scheme
    byte_planes: bool = True                 # store float byte streams as byte planes where that codes smaller
    compress_files_from: int = 1 << 16       # graph, tokenizer and tables files this big or bigger are stored
                                             # compressed when that saves 10%
    file_codec: str = "deflate"              # how: "deflate" (zlib, what the browser's DecompressionStream reads)
                                             # or "qz" (our LZW chunks, as version 2 did)
    warmup_model: bool = True                # with the wasm graph: also write warmup/, a tiny model of the same
                                             # schemes the page runs while the weights load (warmup_model.py)

    def resolved_embed_scheme(self) -> str:
        if self.embed_scheme:
            return self.embed_scheme
        return self.scheme if self.scheme in ("f32", "f16") else "int8"


def entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    """Order-0 entropy in bits per symbol."""
    if symbols.size == 0:
        return 0.0
    counts = np.zeros(max(alphabet, 1), np.float64)
    for r in range(0, symbols.size, 1 << 20):            # blocks: bincount widens its input to int64
        counts += np.bincount(symbols[r:r + (1 << 20)], minlength=alphabet)
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum())


class _BlobWriter:
    """Appends chunks to weights-NNN.qzb files, starting a new blob when the current one would pass the cap."""

    def __init__(self, folder: Path, cap: int):
        self.folder, self.cap = folder, cap
        self.blobs: list[dict[str, Any]] = []
        self._f = None
        self._hash = None
        self._size = 0

    def _open_next(self):
        self.close()
        name = f"weights-{len(self.blobs):03d}.qzb"
        self._f = open(self.folder / name, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self.blobs.append({"file": name})

    def start_initializer(self, expected_bytes: int):
        """Keep an initializer's chunks in one blob when they fit (fewer blobs per tensor for the page)."""
        if self._f is None or (self._size and self._size + expected_bytes > self.cap):
            self._open_next()

    def append(self, data: bytes) -> tuple[int, int]:
        if self._f is None:
            self._open_next()
        off = self._size
        self._f.write(data)
        self._hash.update(data)
        self._size += len(data)
        return len(self.blobs) - 1, off

    def close(self):
        if self._f is not None:
            self._f.close()
            self.blobs[-1].update(bytes=self._size, sha256=self._hash.hexdigest())
            self._f = None


def byte_planes(init: Initializer) -> int:
    """How many byte planes a float byte stream is stored in: its item size (2 for float16, 4 for float32) when
    splitting the bytes by position lowers the order-0 entropy by at least 1%, else 1 (stored as is).

    A float's bytes are nothing alike — float16's high byte (sign, exponent, top mantissa bits) takes a few dozen
    values, its low byte nearly all 256 — and an order-0 coder sees their mixture. Stored as planes (byte 0 of
    every element, then byte 1, ...), each chunk holds one kind of byte. Only whole chunks move; the loader puts
    each chunk's bytes back at stride `planes` when it places them, so no decoder changes and no second pass.
    """
    itemsize = np.dtype(init.dtype).itemsize
    if init.layout != lzw.LAYOUT_U8 or init.alphabet != 256 or init.bias or itemsize == 1 \
            or init.dtype not in ("float16", "float32") or init.symbols.size < 64 * itemsize:
        return 1
    whole = entropy_bits(init.symbols, 256)
    split = np.mean([entropy_bits(init.symbols[p::itemsize], 256) for p in range(itemsize)])
    return itemsize if split < 0.99 * whole else 1


def _encode_initializer(init: Initializer, blobs: _BlobWriter, opts: BuildOptions) -> dict[str, Any]:
    """Cut the initializer's symbol stream into chunks, encode each, append to the blob, return its manifest entry.

    With byte planes (see `byte_planes`) the stream is stored plane after plane, and no chunk spans two planes;
    a chunk's out_offset is then its offset in that stored order."""
    if init.nbytes > MAX_INITIALIZER_BYTES:
        raise BundleError(f"initializer {init.name}: {init.nbytes} bytes exceeds the 2 GB browser buffer limit")
    planes = byte_planes(init) if opts.byte_planes else 1
    sym = init.symbols
    if planes > 1:
        sym = np.ascontiguousarray(sym.reshape(-1, planes).T).reshape(-1)
    step = opts.chunk_symbols
    # worst case size: packed bytes + headers; used only to keep the initializer in one blob when possible
    blobs.start_initializer(lzw.layout_nbytes(init.layout, sym.size) + lzw.HEADER_SIZE * (sym.size // step + planes))
    chunks = []
    blob_index = None
    out_off = 0
    plane_len = sym.size // planes
    starts = [s for p in range(planes) for s in range(p * plane_len, max((p + 1) * plane_len, 1), step)]
    for start in starts:
        part = sym[start:min(start + step, (start // plane_len + 1) * plane_len if plane_len else start + step)]
        data = codec.encode_chunk(part, init.alphabet, init.layout, init.bias, max_code_bits=opts.max_code_bits)
        b, off = blobs.append(data)
        if blob_index is None:
            blob_index = b
        elif b != blob_index:
            raise BundleError(f"initializer {init.name}: chunks span two blobs (blob cap too small)")
        method = data[3]
        n_out = lzw.layout_nbytes(init.layout, part.size)
        chunks.append([off, len(data), int(part.size), METHOD_NAMES[method], out_off])
        out_off += n_out
    if out_off != init.nbytes:
        raise BundleError(f"initializer {init.name}: chunks decode to {out_off} bytes, tensor needs {init.nbytes}")
    entropy = (np.mean([entropy_bits(sym[p * plane_len:(p + 1) * plane_len], 256) for p in range(planes)])
               if planes > 1 else entropy_bits(sym, max(init.alphabet, 1)))
    entry = {"name": init.name, "dtype": init.dtype, "shape": list(init.shape), "nbytes": init.nbytes,
             "alphabet": init.alphabet, "layout": init.layout, "bias": init.bias, "blob": blob_index,
             "entropy_bits": round(float(entropy), 5),
             "stored_bytes": sum(c[1] for c in chunks), "chunks": chunks}
    if planes > 1:
        entry["planes"] = planes
    return entry


def _write_file(folder: Path, fname: str, data: bytes, opts: BuildOptions) -> dict[str, Any]:
    """Write one graph, tokenizer or tables file, as is or — when it is big and compressing saves at least 10% —
    compressed: by default as `fname.zlib`, one zlib (deflate) stream, under "deflate" in the manifest entry; with
    file_codec="qz" as `fname.qz`, QZ chunks of its bytes (alphabet 256) with their table under "qz". "bytes" and
    "sha256" always describe the file itself, so a reader checks what it decoded.

    Why deflate for these: they are text and protobuf, not quantized symbols, and LZW codes them poorly — SmolLM2's
    model.onnx (649 KB, 30 near-identical layers) is 110.5 KB as QZ and 41.5 KB as deflate, tables.json 51.0 vs
    27.9 KB (the packed tokenizer, 226 vs 223 KB, is high-entropy either way). The page inflates them with the
    browser's own DecompressionStream."""
    info: dict[str, Any] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if len(data) >= opts.compress_files_from and opts.file_codec == "deflate":
        z = zlib.compress(data, 9)
        if len(z) <= 0.9 * len(data):
            (folder / (fname + DEFLATE_SUFFIX)).write_bytes(z)
            info["deflate"] = {"file": fname + DEFLATE_SUFFIX, "bytes": len(z)}
            return info
    elif len(data) >= opts.compress_files_from:
        sym = np.frombuffer(data, np.uint8)
        parts, chunks, off = [], [], 0
        for start in range(0, sym.size, opts.chunk_symbols):
            part = sym[start:start + opts.chunk_symbols]
            c = codec.encode_chunk(part, 256, lzw.LAYOUT_U8, 0, max_code_bits=opts.max_code_bits)
            chunks.append([off, len(c), int(part.size), METHOD_NAMES[c[3]], start])
            parts.append(c)
            off += len(c)
        if off <= 0.9 * len(data):
            (folder / (fname + ".qz")).write_bytes(b"".join(parts))
            info["qz"] = {"file": fname + ".qz", "bytes": off, "chunks": chunks}
            return info
    (folder / fname).write_bytes(data)
    return info


def _read_file(folder: Path, fname: str, info: dict, step: int) -> bytes:
    """A graph's, tokenizer or tables file's bytes, decoded from its .qz chunks or its deflate stream when it has
    them; size and SHA-256 checked."""
    if "deflate" in info:
        data = _inflate(folder / info["deflate"]["file"], info["bytes"])
    elif "qz" not in info:
        data = (folder / fname).read_bytes()
    else:
        q = info["qz"]
        src = (folder / q["file"]).read_bytes()
        _want(len(src) == q["bytes"], q["file"], f"{len(src)} bytes on disk, manifest says {q['bytes']}")
        out = bytearray(info["bytes"])
        view = memoryview(out)
        for k, (off, length, n_sym, method, out_off) in enumerate(q["chunks"]):
            where = f"{q['file']}: chunk {k} at byte offset {off}"
            try:
                n_out = codec.decode_into(src[off:off + length], view[out_off:out_off + n_sym])
            except CodecError as err:
                raise BundleError(f"{where}: {err}") from None
            hdr = lzw.parse_header(src[off:off + length])
            _want(n_out == n_sym and hdr.alphabet == 256 and hdr.layout == lzw.LAYOUT_U8 and hdr.bias == 0 and
                  METHOD_NAMES[hdr.method] == method, where, "header disagrees with the manifest chunk table")
        view.release()
        data = bytes(out)
    where = fname if _stored_name(fname, info) == fname else f"{_stored_name(fname, info)} (decoded: {fname})"
    _want(len(data) == info["bytes"], where, f"{len(data)} bytes, manifest says {info['bytes']}")
    _want(hashlib.sha256(data).hexdigest() == info.get("sha256"), where, "SHA-256 mismatch")
    return data


def _inflate(path: Path, size: int) -> bytes:
    """A zlib stream that must decode to exactly `size` bytes (never more than size + 1 are produced)."""
    src = path.read_bytes()
    d = zlib.decompressobj()
    try:
        data = d.decompress(src, size + 1)
    except zlib.error as e:
        raise BundleError(f"{path.name}: not a valid zlib (deflate) stream: {e}") from None
    _want(len(data) <= size, path.name, f"decodes to more than the {size} bytes the manifest lists")
    _want(d.eof, path.name, f"the deflate stream ends early (truncated at byte offset {len(src)})")
    _want(not d.unused_data, path.name,
          f"{len(d.unused_data)} bytes after the deflate stream, from byte offset {len(src) - len(d.unused_data)}")
    return data


def _stored_name(fname: str, info: dict) -> str:
    """The file a graph, tokenizer or tables entry is on disk as: fname, fname.qz or fname.zlib."""
    for form in STORED_FORMS:
        if isinstance(info, dict) and form in info:
            return info[form]["file"]
    return fname


def _stored_bytes(info: dict) -> int:
    """The bytes a graph, tokenizer or tables entry takes on disk."""
    return next((info[f]["bytes"] for f in STORED_FORMS if f in info), info["bytes"])


def _stored_forms(info, m: dict, where: str) -> set[str]:
    """The optional stored-form key of a file entry ({"qz"}, {"deflate"} from version 3 on, or none)."""
    allowed = {"qz"} | ({"deflate"} if m["version"] >= 3 else set())
    got = allowed & set(info if isinstance(info, dict) else ())
    _want(len(got) <= 1, where, "stored both as QZ chunks and as a deflate stream")
    return got


def _validate_deflate_file(fname: str, info: dict, where: str):
    """The "deflate" entry of a compressed graph, tokenizer or tables file: its name and size."""
    w = f"{where}.deflate"
    d = info["deflate"]
    _keys(d, {"file", "bytes"}, w)
    _want(d["file"] == fname + DEFLATE_SUFFIX, f"{w}.file", f"expected {fname + DEFLATE_SUFFIX!r}")
    _int(d["bytes"], f"{w}.bytes", 1)
    _int(info.get("bytes"), f"{where}.bytes", 1)


def _validate_qz_file(fname: str, info: dict, step: int, where: str):
    """The "qz" table of a compressed graph or tokenizer file: its name, and chunks that tile the file in order."""
    w = f"{where}.qz"
    step = _int(step, f"{MANIFEST}: codec.chunk_symbols", 4, 1 << 32)
    q = info["qz"]
    _keys(q, {"file", "bytes", "chunks"}, w)
    _want(q["file"] == fname + ".qz", f"{w}.file", f"expected {fname + '.qz'!r}")
    size = _int(q["bytes"], f"{w}.bytes", lzw.HEADER_SIZE)
    total = _int(info.get("bytes"), f"{where}.bytes", 1)
    chunks = q["chunks"]
    _want(isinstance(chunks, list) and chunks, f"{w}.chunks", "must be a non-empty list")
    expect_out, expect_off = 0, 0
    for k, c in enumerate(chunks):
        cw = f"{w}.chunks[{k}]"
        _want(isinstance(c, list) and len(c) == 5, cw, "must be [offset, length, symbols, method, out_offset]")
        _want(_int(c[0], f"{cw}.offset") == expect_off, f"{cw}.offset", f"expected {expect_off} (chunks in order)")
        expect_off += _int(c[1], f"{cw}.length", lzw.HEADER_SIZE)
        n_sym = _int(c[2], f"{cw}.symbols", 1, step)
        _want(c[3] in ("lzw", "packed"), f"{cw}.method", f"expected lzw or packed, got {c[3]!r}")
        _want(_int(c[4], f"{cw}.out_offset") == expect_out, f"{cw}.out_offset", f"expected {expect_out}")
        _want(k == len(chunks) - 1 or n_sym == step, f"{cw}.symbols",
              f"every chunk but the last holds codec.chunk_symbols = {step} symbols")
        expect_out += n_sym
    _want(expect_off == size, f"{w}.chunks", f"cover {expect_off} bytes, the file has {size}")
    _want(expect_out == total, f"{w}.chunks", f"decode to {expect_out} bytes, the file has {total}")


def _tensor_initializers(name: str, w: np.ndarray, scheme: str, q=None, importance: np.ndarray | None = None,
                         relative: np.ndarray | None = None) -> tuple[list[Initializer], dict[str, Any]]:
    """Quantize one HF tensor (or take `q`, already quantized by calibration) and lay it out; norms stay float32.
    `importance`: of each row, for the schemes that weigh rows (int8-eB on the vocabulary rows); `relative`: their
    relative row steps given directly (int8-eB on a smoothed weight's rows, row_relative)."""
    if w.ndim == 1:
        return [byte_stream(name, w.astype(np.float32))], {"scheme": "f32", "max_error": 0.0, "rms_error": 0.0}
    sch = get_scheme(scheme)
    if q is None and sch.target_bits is not None:
        q = sch.quantize(w, importance, relative)
    q = q or quantize_rows(sch, w)
    scheme = q.scheme
    return linear_initializers(name, q), {"scheme": scheme, "max_error": q.max_error, "rms_error": q.rms_error}


def _vocab_importance(checkpoint, rows: int) -> np.ndarray:
    """Importance of the rows of a vocabulary tensor for int8-eB without calibration: the token-id prior, with
    the tokenizer's special tokens (chat markers, end of turn) at the top whatever their id."""
    try:
        special = entropy.special_token_ids(json.loads(checkpoint.tokenizer_files()["tokenizer.json"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"tokenizer.json: cannot read the special tokens ({e})") from None
    return entropy.token_importance(rows, special)


def _resolve_source(checkpoint, opts: BuildOptions) -> BuildOptions:
    """--scheme / --embed-scheme "source": the schemes of the formats the checkpoint stores (loaders.source_schemes)."""
    from .loaders import SOURCE, source_schemes

    if SOURCE not in (opts.scheme, opts.embed_scheme):
        return opts
    scheme, embed = source_schemes(checkpoint)
    embed_scheme = opts.embed_scheme
    if embed_scheme == SOURCE or (embed_scheme is None and opts.scheme == SOURCE):
        embed_scheme = embed                  # with --scheme source the embedding stays as stored unless told
    return dataclasses.replace(opts, scheme=scheme if opts.scheme == SOURCE else opts.scheme, embed_scheme=embed_scheme)


def _passthrough(checkpoint, name: str, scheme: str, w: np.ndarray):
    """The checkpoint's own blocks when it stores this tensor in exactly `scheme`'s format (GGUF Q4_0/Q4_1/Q8_0 as
    q4_0/q4_1/q8_0): kept as they are instead of requantizing their dequantized floats. The error against those
    floats is still measured for the manifest, and is 0."""
    if w.ndim != 2:
        return None
    q = checkpoint.load_blocks(name, scheme)
    if q is None:
        return None
    mx, rms = errors(w, get_scheme(scheme).dequantize(q))
    return dataclasses.replace(q, max_error=mx, rms_error=rms)


# where smoothing was measured (README "Quality"): int8 (per-token int8 activations at run time) and the 4-bit
# group schemes, whose weights it quantizes where the activations are large, finer (as AWQ does)
SMOOTH_SCHEMES = ("int8", "int4-g32", "int4-g64", "int4-m32", "int4-m64")
# where `--smooth auto` (the default for these) picks each layer group's alpha by its quantized output error: the
# weight-only schemes, whose error that measures (int8's is mostly its run-time activation rounding)
SEARCH_SCHEMES = ("int4-g32", "int4-g64", "int4-m32", "int4-m64")
# and the entropy-coded int8-eB linear layers (quant/entropy.py): one step per matrix for a target rate, so the
# smoothing scales are the only way their columns get finer or coarser steps (docs/quality.md, session 19)
SEARCH_NAMES = "int4-g32/g64, int4-m32/m64, int8-eB"
SMOOTH_NAMES = "int8, " + SEARCH_NAMES


def searchable(scheme: str) -> bool:
    """Whether `--smooth auto` applies to linear layers of this scheme (weight-only: their output error is what the
    search measures)."""
    return scheme in SEARCH_SCHEMES or entropy.parse(scheme) is not None


def smoothable(scheme: str) -> bool:
    return scheme in SMOOTH_SCHEMES or searchable(scheme)


def resolve_smooth(checkpoint, opts: BuildOptions) -> float | str | None:
    """What opts.smooth means for this scheme and checkpoint: an alpha, "auto", or None (no smoothing). By default
    the weight-only int4 and int8-eB schemes search (SmolLM2 int4-g32 KL against the float model 0.353 -> 0.147,
    int4-g64 0.392 -> 0.194, README "Quality"; int8-e3.2 with GPTQ 0.669 -> 0.367, docs/quality.md), when the
    checkpoint has a tokenizer for the calibration text; int8 smooths
    only when asked (it flips a near-tie of the README's first prompt)."""
    v = opts.smooth
    if v is None:
        return "auto" if searchable(opts.scheme) and "tokenizer.json" in checkpoint.tokenizer_files() else None
    if v == "off":
        return None
    if v == "on":
        if not smoothable(opts.scheme):
            raise BundleError(f"--smooth applies to {SMOOTH_NAMES} (where it was measured), not {opts.scheme}")
        return "auto" if searchable(opts.scheme) else 0.5
    return v


SMOOTH_SEQUENCES = 8                          # smoothing's float pass: 8 windows of 256 tokens


def _first_windows(generated: tuple[np.ndarray, dict], n: int) -> tuple[np.ndarray, dict]:
    """The first n windows of generated calibration text (selftext.generated_ids), described as such."""
    ids = generated[0][:n]
    return ids, {**generated[1], "tokens": int(ids.size)}


def _smoothed(checkpoint, opts: BuildOptions, progress, generated=None):
    """The checkpoint with activation smoothing applied as it is loaded (converter/smooth.py): scales from a float
    pass over 2,048 calibration tokens (the end of pydoc_data.topics, disjoint from the perplexity windows; or the
    first windows of `generated`, (ids, description) from selftext.generated_ids)."""
    from .calibrate import CalibrationOptions, calibration_ids
    from .smooth import SmoothedCheckpoint, smoothing_scales

    if not smoothable(opts.scheme):
        raise BundleError(f"--smooth applies to {SMOOTH_NAMES} (where it was measured), not {opts.scheme}")
    qdq = None
    if opts.smooth == "auto":
        if not searchable(opts.scheme):
            raise BundleError(f"--smooth auto searches the weight-only schemes {SEARCH_NAMES}; "
                              f"{opts.scheme} takes an alpha (0.5 measured best for int8)")
        sch = get_scheme(opts.scheme)
        qdq = sch.roundtrip or (lambda w: sch.dequantize(quantize_rows(sch, w)))
    elif not (isinstance(opts.smooth, (int, float)) and 0 < opts.smooth <= 1):
        raise BundleError(f"--smooth: alpha in (0, 1] or 'auto', got {opts.smooth!r}")
    tok = checkpoint.tokenizer_files().get("tokenizer.json")
    if tok is None:
        raise BundleError("--smooth needs the checkpoint's tokenizer.json (for the calibration text)")
    if generated is not None:
        ids, text = _first_windows(generated, SMOOTH_SEQUENCES)
    else:
        ids, text = calibration_ids(json.loads(tok), CalibrationOptions(sequences=SMOOTH_SEQUENCES, seq_len=256))
    alpha = None if opts.smooth == "auto" else float(opts.smooth)
    return SmoothedCheckpoint(checkpoint, smoothing_scales(checkpoint, checkpoint.config, ids, alpha, text,
                                                           progress, qdq))


def write_bundle(checkpoint, out: Path, opts: BuildOptions,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Convert `checkpoint` (a loaders.Checkpoint) into a bundle folder at `out`; returns the manifest."""
    from .onnx_export import export_graph

    out = Path(out)
    opts = _resolve_source(checkpoint, opts)
    get_scheme(opts.scheme)
    embed_scheme = opts.resolved_embed_scheme()
    get_scheme(embed_scheme)
    if opts.chunk_symbols <= 0 or opts.chunk_symbols % 4:
        raise BundleError(f"chunk_symbols must be a positive multiple of 4, got {opts.chunk_symbols}")
    if opts.file_codec not in ("deflate", "qz"):
        raise BundleError(f"file_codec must be deflate or qz, got {opts.file_codec!r}")
    if out.exists() and not opts.force:
        raise BundleError(f"{out}: already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # An advisory lock (released by the kernel even on kill -9) serialises builds into the same output: a second
    # build refuses at once instead of racing. Stale temp folders of killed builds are dot-folders that nothing
    # lists as bundles; the next build into the same output removes them.
    lock_fd = os.open(out.parent / f".{out.name}.lock", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise BundleError(f"{out}: another build into this folder is running") from None
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    calib = None
    try:
        smooth = resolve_smooth(checkpoint, opts)
        generated = None                      # --calib-text generated: sampled once, for smoothing and calibration
        if opts.calibration is not None and opts.calibration.source_text == "generated":
            from .selftext import generated_ids
            if progress:
                progress("calibration text: sampling the float model", 0, 1)
            generated = generated_ids(checkpoint, max(opts.calibration.sequences, SMOOTH_SEQUENCES),
                                      opts.calibration.seq_len)
        if smooth is not None:                # per-channel scales folded into the weights before quantizing
            checkpoint = _smoothed(checkpoint, dataclasses.replace(opts, smooth=smooth), progress, generated)
        if opts.calibration is not None:      # GPTQ & co. need activations: quantize first, layer by layer
            from .calibrate import calibrate
            calib = calibrate(checkpoint, opts.scheme, embed_scheme, opts.calibration, progress,
                              None if generated is None else _first_windows(generated, opts.calibration.sequences))
        extra = _write_warmup(checkpoint, tmp, opts, embed_scheme, export_graph)
        manifest = _write_into(checkpoint, tmp, opts, embed_scheme, progress, export_graph, calib, extra)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if calib is not None:
            calib.close()
        os.close(lock_fd)   # the empty .lock file stays: unlinking it would let two builds lock different inodes


def _write_warmup(checkpoint, folder: Path, opts: BuildOptions, embed_scheme: str, export_graph) -> dict:
    """warmup/ (converter/warmup_model.py) when the bundle gets a wasm graph: the manifest entry {"warmup": ...}
    naming it, its bytes and its manifest's SHA-256; {} when there is none."""
    from .warmup_model import DIR, WarmupCheckpoint

    if not (opts.warmup_model and opts.wasm_graph):
        return {}
    ck = WarmupCheckpoint(checkpoint)
    sub = folder / DIR
    sub.mkdir()
    # every file deflated (they are small, the graphs compress 5-10x), the graph the page runs and model.onnx only,
    # nothing fitted to data: the kernels are what matters, not what they compute
    wopts = BuildOptions(scheme=opts.scheme, embed_scheme=embed_scheme, chunk_symbols=opts.chunk_symbols,
                         max_code_bits=opts.max_code_bits, name=f"{opts.name or Path(str(checkpoint.path)).stem}-warmup",
                         smooth="off", fp16_graph=False, wasm_graph=True, warmup_model=False, compress_files_from=0,
                         file_codec=opts.file_codec)
    m = _write_into(ck, sub, wopts, embed_scheme, None, export_graph)
    if "graph_wasm" not in m:                 # float schemes: the page runs model.onnx, nothing to warm up
        shutil.rmtree(sub)
        return {}
    return {"warmup": {"dir": DIR, "bytes": sum(p.stat().st_size for p in sub.iterdir()),
                       "sha256": hashlib.sha256((sub / MANIFEST).read_bytes()).hexdigest()}}


def _wasm_graph(cfg, weight_types: dict, initializers: list[dict], tensors: list[dict], scheme: str,
                embed_scheme: str, tensor_schemes: dict) -> tuple[bytes, dict, dict, dict, dict[str, int]]:
    """The serialized wasm graph and its manifest tables "transposed": group-scheme codes NAME.q that it reads as
    NAME.q.kn (layouts.transposed_codes) -> whether it also reads NAME.q itself (the Gather of a group-quantized
    embedding that the lm_head shares), and "group_tables": their scales and zero points that it reads as NAME.kn
    (layouts.group_table) -> likewise, "multiplied": int4-mG codes it reads as int8 NAME.kn, and "pieces": the int8
    (K, N) tables it reads as NAME.pieces (layouts.column_pieces) -> their piece width. The export is offered every
    codes, scales and zeros initializer in both forms; the ones no node reads are then removed from it (one export
    instead of a second one without them)."""
    from .onnx_export import check_graph, export_model
    nbits = {i for t in tensors if t.get("scheme") and family(t["scheme"]) == "nbits" for i in t["initializers"]}
    codes = {e["name"]: e for e in initializers if e["name"] in nbits and e["name"].endswith(".q")}
    multiplied = {n for n in codes if multiplied_parts(n)[1] in weight_types}     # int4-mG: 8-bit (q - z)·m
    types = dict(weight_types)
    types.update({n + KN_SUFFIX: ("int8", multiplied_shape(e["shape"], e["layout"])) if n in multiplied else
                  ("uint8", kn_shape(e["shape"], e["layout"])) for n, e in codes.items()})
    tables = {}     # NAME.scales / NAME.zeros -> the codes entry they belong to
    for n, e in codes.items():
        if n in multiplied:
            continue
        for part in (".scales", ".zeros"):
            name = n[:-len(".q")] + part
            if name in weight_types:
                tables[name] = e
                types[name + KN_SUFFIX] = ("float32" if part == ".scales" else "uint8", group_table_shape(e["shape"]))
    # the int8 vocabulary table(s) (H, V), which the lm_head multiplies, in pieces (layouts.column_pieces)
    vocab = {e["name"]: e for e in initializers if e["name"] in VOCAB_CODES
             and e["dtype"] == "int8" and len(e["shape"]) == 2}
    pieces = {n: w for n, e in vocab.items() if (w := piece_width(e["shape"][1])) is not None}

    def layer_width(shape) -> int | None:         # the layers' large (K, N) int8 tables, in narrower pieces
        return piece_width(shape[1], LAYER_PIECE_MAX) if math.prod(shape) >= LAYER_PIECE_MIN_WEIGHTS else None
    # ... int4-mG's layer codes, (K, N) int8 once multiplied (an int4-mG embedding's Gather reads its table whole,
    # so the vocabulary's stay as they are), and int8 layers' codes as stored (the int8 schemes, whose wasm graph is
    # model.onnx with its tables in pieces and, unlike the group schemes', a float32 KV cache: model.onnx's logits)
    int8 = {i for t in tensors if t.get("scheme") and family(t["scheme"]) == "dqmm" for i in t["initializers"]}
    layers = [n + KN_SUFFIX for n in multiplied if n not in VOCAB_CODES] + \
        [e["name"] for e in initializers if e["name"] in int8 and e["name"] not in VOCAB_CODES
         and e["name"].endswith(".q") and e["dtype"] == "int8" and len(e["shape"]) == 2]
    pieces.update({n: w for n in layers if (w := layer_width(types[n][1])) is not None})
    for n, w in pieces.items():
        types[n + PIECES_SUFFIX] = ("int8", pieces_shape(types.pop(n)[1], w))
    model = export_model(cfg, types, scheme, embed_scheme, tensor_schemes, group_gemm=True,
                         kv_float16=any(not n.startswith(("model.embed_tokens.", "lm_head.")) for n in nbits),
                         append_kv=True)
    used = {i for node in model.graph.node for i in node.input}
    offered = {n + KN_SUFFIX for n in list(codes) + list(tables)} | set(codes) | set(tables) | \
        {p for c in multiplied for p in multiplied_parts(c)}
    kept = [t for t in model.graph.initializer if t.name in used or t.name not in offered]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    check_graph(model)
    unread = [n for c in multiplied for n in multiplied_parts(c) if n in used]
    if unread:
        raise BundleError(f"the wasm graph reads {unread[0]}, which its loaders fold into its int8 codes")
    return (model.SerializeToString(),
            {n: n in used for n in codes if n + KN_SUFFIX in used and n not in multiplied},
            {n: n in used for n in tables if n + KN_SUFFIX in used},
            {n: n in used for n in multiplied if {n + KN_SUFFIX, n + KN_SUFFIX + PIECES_SUFFIX} & used},
            {n: w for n, w in pieces.items() if n + PIECES_SUFFIX in used})


def _block_scale_types(types: dict, weights: list[str]) -> dict:
    """The initializers a graph reads when loaders make the block scales of the int4-mG `weights`: NAME.scales
    (float32 [N * n_blocks]) instead of NAME.row_scales and NAME.mults (layouts.block_scales)."""
    out = dict(types)
    for w in weights:
        scales, rows, mults = block_scale_parts(w)
        n_out, n_blocks = types[w + ".q"][1][:2]
        out[scales] = ("float32", (n_out * n_blocks,))
        del out[rows], out[mults]
    return out


def _write_into(checkpoint, folder: Path, opts: BuildOptions, embed_scheme: str, progress, export_graph, calib=None,
                extra_entries: dict | None = None):
    cfg: LlamaConfig = checkpoint.config
    t0 = time.perf_counter()
    blobs = _BlobWriter(folder, opts.blob_bytes)
    tensors, initializers = [], []
    float_bytes = 0
    n_params = 0
    names = list(checkpoint.tensors)
    tensor_schemes = {}                       # tensors whose scheme differs from the build's (mixed precision)
    for i, name in enumerate(names):
        if progress:
            progress(name, i, len(names))
        w = checkpoint.load(name)
        float_bytes += w.size * 4
        n_params += w.size
        scheme = embed_scheme if name in ("model.embed_tokens.weight", "lm_head.weight") else opts.scheme
        q = calib.get(name) if calib and name in calib else _passthrough(checkpoint, name, scheme, w)
        vocab_rows = name in ("model.embed_tokens.weight", "lm_head.weight") and get_scheme(scheme).target_bits
        importance = _vocab_importance(checkpoint, w.shape[0]) if vocab_rows and q is None else None
        relative = row_relative(checkpoint, name) if q is None and w.ndim == 2 and not vocab_rows else None
        inits, info = _tensor_initializers(name, w, scheme, q, importance, relative)
        if w.ndim == 2 and info["scheme"] != scheme:
            tensor_schemes[name] = info["scheme"]
        del w
        entries = [_encode_initializer(init, blobs, opts) for init in inits]
        initializers.extend(entries)
        tensors.append({"name": name, "shape": list(checkpoint.tensors[name].shape),
                        "source_dtype": checkpoint.tensors[name].dtype, **info,
                        "initializers": [e["name"] for e in entries]})
    blobs.close()
    if progress:
        progress("model.onnx", len(names), len(names))

    weight_types = {e["name"]: (e["dtype"], tuple(e["shape"])) for e in initializers}
    # int4-mG: model.onnx and the float16 graph read NAME.scales, which loaders make (layouts.block_scales)
    scaled = sorted(n[:-len(".mults")] for n in weight_types if n.endswith(".mults"))
    extra = {"block_scales": scaled} if scaled else {}
    graph_types = _block_scale_types(weight_types, scaled)
    graph_bytes = export_graph(cfg, graph_types, opts.scheme, embed_scheme, tensor_schemes)
    graphs = {"graph": {"file": GRAPH, **_write_file(folder, GRAPH, graph_bytes, opts), **extra}}
    if opts.fp16_graph:
        fp16_bytes = export_graph(cfg, graph_types, opts.scheme, embed_scheme, tensor_schemes, float16=True)
        graphs["graph_fp16"] = {"file": GRAPH_FP16, **_write_file(folder, GRAPH_FP16, fp16_bytes, opts), **extra}
    if opts.wasm_graph and any(t.get("scheme") and family(t["scheme"]) in ("nbits", "dqmm") for t in tensors):
        wasm_bytes, transposed, group_tables, multiplied, pieces = _wasm_graph(
            cfg, weight_types, initializers, tensors, opts.scheme, embed_scheme, tensor_schemes)
        graphs["graph_wasm"] = {"file": GRAPH_WASM, **_write_file(folder, GRAPH_WASM, wasm_bytes, opts),
                                "transposed": transposed, "group_tables": group_tables,
                                **({"multiplied": multiplied} if multiplied else {}),
                                **({"pieces": pieces} if pieces else {})}

    tok_entries = {fname: _write_file(folder, fname, data, opts)
                   for fname, data in sorted(_stored_tokenizer_files(checkpoint).items())}

    tables = {"file": TABLES, **_write_file(folder, TABLES, json.dumps(
        {"tensors": tensors, "initializers": initializers}, separators=(",", ":")).encode(), opts)}
    stored = sum(b["bytes"] for b in blobs.blobs)
    quantized_params = sum(t_n for t_n in (int(np.prod(t["shape"])) for t in tensors))
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "codec": {"name": "qz", "version": 1, "chunk_symbols": opts.chunk_symbols, "max_code_bits": opts.max_code_bits},
        "name": opts.name or Path(str(checkpoint.path)).stem,
        "producer": f"tiny-qmoe {__version__}",
        "source": {"file": Path(str(checkpoint.path)).name, "kind": checkpoint.kind},
        "scheme": opts.scheme,
        "embed_scheme": embed_scheme,
        "config": cfg.to_dict(),
        **graphs,
        "tokenizer": tok_entries,
        "blobs": blobs.blobs,
        "tables": tables,
        **(extra_entries or {}),
        "totals": {
            "parameters": n_params,
            "float32_bytes": float_bytes,
            "runtime_bytes": sum(e["nbytes"] for e in initializers),
            "blob_bytes": stored,
            "bundle_bytes": stored + sum(_stored_bytes(g) for g in (*graphs.values(), *tok_entries.values(), tables))
            + sum(e["bytes"] for e in (extra_entries or {}).values()),
            "bits_per_weight_blobs": round(8 * stored / max(quantized_params, 1), 4),
        },
    }
    if calib is not None:
        manifest["calibration"] = calib.record
    if getattr(checkpoint, "smoothing", None) is not None:
        manifest["smoothing"] = checkpoint.smoothing.record()
    manifest["totals"]["bundle_bytes"] += len(_dump(manifest))  # close enough: the manifest counts itself
    manifest["totals"]["bits_per_weight_all_in"] = round(8 * manifest["totals"]["bundle_bytes"] / max(n_params, 1), 4)
    manifest["integrity"] = {"sha256": manifest_digest(manifest)}
    (folder / MANIFEST).write_bytes(_dump(manifest))
    manifest.update(tensors=tensors, initializers=initializers, _build_seconds=time.perf_counter() - t0)
    return manifest                   # as load() returns it: the tables merged in


def _stored_tokenizer_files(checkpoint) -> dict[str, bytes]:
    """The tokenizer files as the bundle stores them: tokenizer.json packed (runtime.tokenizer.pack: tokens once,
    merges as token id + split; a reader gets the same dict back from Bundle.tokenizer_json), the others as is."""
    files = dict(checkpoint.tokenizer_files())
    packed = tokenizer_pack(json.loads(files["tokenizer.json"]))
    if packed is not None:
        files["tokenizer.json"] = json.dumps(packed, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return files


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, compact, without "integrity" and private keys): any
    edit of the manifest that does not also recompute this is caught before a single field is trusted."""
    body = {k: v for k, v in manifest.items() if k != "integrity" and not k.startswith("_")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_SCALAR_LIST = re.compile(r"\[\n\s*([^\[\]{}]*?)\n\s*\]")


def _dump(manifest: dict[str, Any]) -> bytes:
    """Indented JSON, but every list of plain values (a chunk, a shape) on one line: chunk tables are most of a
    manifest, and one line per number tripled its size."""
    text = json.dumps({k: v for k, v in manifest.items() if not k.startswith("_")}, indent=1)
    text = _SCALAR_LIST.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)
    return (text + "\n").encode()


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1}


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    config: LlamaConfig
    initializers: list[dict[str, Any]] = field(default_factory=list)

    def blob_path(self, index: int) -> Path:
        return self.path / self.manifest["blobs"][index]["file"]

    def graph_bytes(self, float16: bool = False, variant: str = "graph") -> bytes:
        """model.onnx, or a variant: float16=True / variant="graph_fp16" the float16 graph, variant="graph_wasm"
        the group-GEMM graph (BundleError if the bundle has none)."""
        variant = "graph_fp16" if float16 else variant
        if variant == "graph":
            return _read_file(self.path, GRAPH, self.manifest["graph"], self.manifest["codec"]["chunk_symbols"])
        if variant not in GRAPH_VARIANTS:
            raise BundleError(f"unknown graph variant {variant!r}; choose graph, {', '.join(GRAPH_VARIANTS)}")
        if variant not in self.manifest:
            what = {"graph_fp16": "float16 graph (built with fp16_graph off, or before it)",
                    "graph_wasm": "wasm graph (it has no group-quantized tensor, or was built before it)"}[variant]
            raise BundleError(f"{self.path}: bundle has no {what}")
        return _read_file(self.path, GRAPH_VARIANTS[variant], self.manifest[variant],
                          self.manifest["codec"]["chunk_symbols"])

    def tokenizer_file(self, fname: str) -> bytes:
        """A tokenizer file's bytes (decoded when the bundle stores it as QZ chunks, `fname.qz`)."""
        return _read_file(self.path, fname, self.manifest["tokenizer"][fname], self.manifest["codec"]["chunk_symbols"])

    def tokenizer_json(self) -> dict:
        """tokenizer.json as the source had it (unpacked: the bundle stores it packed when it can)."""
        try:
            return tokenizer_unpack(json.loads(self.tokenizer_file("tokenizer.json").decode("utf-8")))
        except ValueError as e:                      # bad JSON or UTF-8, or a malformed packed model
            raise BundleError(f"{self.path / 'tokenizer.json'}: {e}") from None

    def tokenizer_config(self) -> dict:
        if "tokenizer_config.json" not in self.manifest["tokenizer"]:
            return {}
        return json.loads(self.tokenizer_file("tokenizer_config.json").decode("utf-8"))

    def decode_initializers(self, verify: bool = True):
        """Yield (entry, numpy array) for every initializer, decoding chunks straight into the array's buffer."""
        with self.open_initializers(verify) as read:
            for e in self.initializers:
                yield e, read(e["name"])

    @contextlib.contextmanager
    def open_initializers(self, verify: bool = True):
        """`with bundle.open_initializers() as read:` read(name) decodes that one initializer into a new array.

        Chunks are read one at a time (pread), not through a mapping of the whole blob: a mapped blob's pages count
        in the process's memory until it is unmapped (SmolLM2 int8: +52 MiB at the peak of a session)."""
        if verify:
            for b in range(len(self.manifest["blobs"])):
                self.verify_blob(b)
        by_name = {e["name"]: e for e in self.initializers}
        fds: dict[int, int] = {}

        def read(name: str) -> np.ndarray:
            if name not in by_name:
                raise BundleError(f"{MANIFEST}: no initializer named {name!r}")
            e = by_name[name]
            if e["blob"] not in fds:
                fds[e["blob"]] = os.open(self.blob_path(e["blob"]), os.O_RDONLY)
            return self._decode_initializer(e, fds[e["blob"]])

        try:
            yield read
        finally:
            for fd in fds.values():
                os.close(fd)

    def _decode_initializer(self, e: dict, fd: int):
        """One initializer as an array, its chunks read from the open blob fd."""
        planes = e.get("planes", 1)
        arr = np.empty(e["nbytes"], np.uint8)
        stored = arr if planes == 1 else np.empty(e["nbytes"], np.uint8)   # planes: decoded in stored order
        view = memoryview(stored)
        for k, (off, length, n_sym, method, out_off) in enumerate(e["chunks"]):
            chunk = os.pread(fd, length, off)
            if len(chunk) != length:
                raise BundleError(f"{self.manifest['blobs'][e['blob']]['file']}: initializer {e['name']} chunk {k} "
                                  f"at byte offset {off}: the file ends after {off + len(chunk)} bytes")
            try:
                n_out = codec.decode_into(chunk, view[out_off:])
            except CodecError as err:
                raise BundleError(f"{self.manifest['blobs'][e['blob']]['file']}: initializer {e['name']} chunk {k} "
                                  f"at byte offset {off}: {err}") from None
            hdr = lzw.parse_header(chunk)
            if hdr.n_symbols != n_sym or METHOD_NAMES[hdr.method] != method or \
                    hdr.alphabet != e["alphabet"] or hdr.layout != e["layout"] or hdr.bias != e["bias"] or \
                    n_out != lzw.layout_nbytes(e["layout"], n_sym):
                raise BundleError(f"{self.manifest['blobs'][e['blob']]['file']}: initializer {e['name']} chunk {k} "
                                  f"at byte offset {off}: header disagrees with the manifest chunk table")
        if planes > 1:                    # plane p holds byte p of every element
            arr.reshape(-1, planes)[:] = stored.reshape(planes, -1).T
            del stored
        return arr.view(np.dtype(e["dtype"])).reshape(e["shape"])

    def verify_blob(self, index: int) -> None:
        """Size and SHA-256 of one blob against the manifest, read in 1 MiB pieces."""
        info = self.manifest["blobs"][index]
        h, size = hashlib.sha256(), 0
        with open(self.blob_path(index), "rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
                size += len(piece)
        if size != info["bytes"]:
            raise BundleError(f"{info['file']}: {size} bytes on disk, manifest says {info['bytes']}")
        if h.hexdigest() != info["sha256"]:
            raise BundleError(f"{info['file']}: SHA-256 mismatch (corrupted or modified blob)")


def _want(cond: bool, where: str, what: str):
    if not cond:
        raise BundleError(f"{where}: {what}")


def _int(v, where: str, lo: int = 0, hi: int = 1 << 62) -> int:
    _want(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, where,
          f"expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def load(path: str | Path, _warmup_of: LlamaConfig | None = None) -> Bundle:
    """Read and validate a bundle's manifest against the files on disk (blob hashes are checked on decode; those of
    the warm-up model a bundle carries, warmup/, here). _warmup_of: the config of the bundle whose warmup/ this is."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing (not a bundle folder)")
    try:
        text = mpath.read_text(encoding="utf-8")
        m = json.loads(text)
    except UnicodeDecodeError as e:
        raise BundleError(f"{mpath}: not UTF-8 at byte offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath}: invalid JSON at byte offset {e.pos}: {e.msg}") from None
    M = MANIFEST
    _want(text.endswith("}\n") or text.endswith("}"), M,
          f"unexpected bytes after the closing brace at byte offset {len(text.rstrip()) }")
    _want(isinstance(m, dict), M, "top level must be an object")
    _want(m.get("format") == FORMAT_NAME, f"{M}: format", f"expected {FORMAT_NAME!r}, got {m.get('format')!r}")
    _want(type(m.get("version")) is int and m["version"] in READABLE_VERSIONS, f"{M}: version",
          f"this reader supports versions {', '.join(map(str, READABLE_VERSIONS))}, got {m.get('version')!r}")
    integrity = m.get("integrity")
    _want(isinstance(integrity, dict) and isinstance(integrity.get("sha256"), str), f"{M}: integrity",
          "missing the manifest checksum")
    _want(integrity["sha256"] == manifest_digest(m), f"{M}: integrity.sha256",
          "does not match the manifest's content (edited or corrupted manifest)")
    if m["version"] >= 2:
        _merge_tables(path, m)
    _validate_schema(m)
    for key, typ in (("config", dict), ("graph", dict), ("tokenizer", dict), ("blobs", list), ("tensors", list),
                     ("initializers", list), ("scheme", str), ("embed_scheme", str)):
        _want(isinstance(m.get(key), typ), f"{M}: {key}", f"missing or not a {typ.__name__}")
    try:
        cfg = LlamaConfig.from_dict(m["config"])
    except (TinyQMoEError, TypeError, ValueError) as e:
        raise BundleError(f"{M}: config: {e}") from None
    for s in (m["scheme"], m["embed_scheme"]):
        try:
            get_scheme(s)
        except TinyQMoEError as e:
            raise BundleError(f"{M}: scheme: {e}") from None
    # files listed must exist with the listed sizes
    g = m["graph"]
    _want(g.get("file") == GRAPH, f"{M}: graph.file", f"expected {GRAPH!r}")
    step = m["codec"]["chunk_symbols"] if isinstance(m.get("codec"), dict) else None
    _check_stored(path, GRAPH, g, f"{M}: graph", step)
    for fname, info in m["tokenizer"].items():
        _want(fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"),
              f"{M}: tokenizer", f"unexpected file name {fname!r}")
        _check_stored(path, fname, info, f"{M}: tokenizer.{fname}", step)
    _want("tokenizer.json" in m["tokenizer"], f"{M}: tokenizer", "tokenizer.json is not listed")
    for i, b in enumerate(m["blobs"]):
        where = f"{M}: blobs[{i}]"
        _want(isinstance(b, dict) and isinstance(b.get("file"), str), where, "needs a file name")
        _want(b["file"] == f"weights-{i:03d}.qzb", f"{where}.file", f"expected weights-{i:03d}.qzb")
        _int(b.get("bytes"), f"{where}.bytes")
        _want(isinstance(b.get("sha256"), str) and len(b["sha256"]) == 64, f"{where}.sha256", "not a SHA-256 hex")
        _check_file(path, b["file"], b, where)
    for key, fname in GRAPH_VARIANTS.items():
        if key in m:
            _want(m[key].get("file") == fname, f"{M}: {key}.file", f"expected {fname!r}")
            _check_stored(path, fname, m[key], f"{M}: {key}", step)
    on_disk = _stored_name
    listed = {MANIFEST, on_disk(GRAPH, m["graph"]), *(on_disk(f, i) for f, i in m["tokenizer"].items()),
              *(b["file"] for b in m["blobs"]), *([on_disk(TABLES, m["tables"])] if "tables" in m else [])} | \
        {on_disk(fname, m[key]) for key, fname in GRAPH_VARIANTS.items() if key in m}
    if "warmup" in m:
        _want(_warmup_of is None, f"{M}: warmup", "a warm-up model has none of its own")
        listed.add(_check_warmup(path, m, cfg))
    unlisted = sorted(p.name for p in path.iterdir() if p.name not in listed)
    _want(not unlisted, str(path), f"holds file(s) the manifest does not list: {', '.join(unlisted[:5])}")
    _validate_initializers(m, cfg)
    _validate_transposed(m)
    _validate_group_tables(m)
    _validate_multiplied(m)
    _validate_pieces(m)
    _validate_block_scales(m)
    _validate_tensors(m, cfg)
    _validate_graph(path, m, GRAPH)
    for key, fname in GRAPH_VARIANTS.items():
        if key in m:
            _validate_graph(path, m, fname)
    return Bundle(path, m, cfg, m["initializers"])


def _check_warmup(path: Path, m: dict, cfg: LlamaConfig) -> str:
    """The warm-up model (converter/warmup_model.py) the manifest lists: its folder holds exactly the bytes listed,
    its manifest has the listed SHA-256, and it is a valid bundle of the same schemes and of warmup_config(cfg)
    whose blobs decode (the page runs it; the reference runtime does not). Returns the folder's name."""
    from .warmup_model import DIR, warmup_config

    w, where = m["warmup"], f"{MANIFEST}: warmup"
    _want(isinstance(w, dict) and set(w) == {"dir", "bytes", "sha256"}, where, "expected dir, bytes and sha256")
    _want(w["dir"] == DIR, f"{where}.dir", f"expected {DIR!r}")
    _int(w["bytes"], f"{where}.bytes")
    _want(isinstance(w["sha256"], str) and len(w["sha256"]) == 64, f"{where}.sha256", "not a SHA-256 hex")
    sub = path / DIR
    _want(sub.is_dir() and not sub.is_symlink(), f"{DIR}/", "missing (the manifest lists a warm-up model)")
    files = list(sub.iterdir())
    _want(all(p.is_file() and not p.is_symlink() for p in files), f"{DIR}/", "holds something other than files")
    total = sum(p.stat().st_size for p in files)
    _want(total == w["bytes"], f"{DIR}/", f"holds {total} bytes, {where}.bytes says {w['bytes']}")
    mpath = sub / MANIFEST
    _want(mpath.is_file() and hashlib.sha256(mpath.read_bytes()).hexdigest() == w["sha256"], f"{DIR}/{MANIFEST}",
          f"missing or its SHA-256 does not match {where}.sha256")
    try:
        wb = load(sub, _warmup_of=cfg)
        wm = wb.manifest
        _want((wm["scheme"], wm["embed_scheme"]) == (m["scheme"], m["embed_scheme"]), f"{MANIFEST}: scheme",
              f"{wm['scheme']}/{wm['embed_scheme']}, the bundle's are {m['scheme']}/{m['embed_scheme']}")
        _want(wb.config == warmup_config(cfg), f"{MANIFEST}: config", "is not the warm-up shape of the bundle's config")
        _want("graph_wasm" in wm, MANIFEST, "has no wasm graph (the only graph the page warms up with)")
        for _ in wb.decode_initializers():
            pass
    except BundleError as e:
        raise BundleError(f"{DIR}: {e}") from None
    return DIR


def _merge_tables(path: Path, m: dict):
    """Version 2: read tables.json (plain, or its QZ chunks), check its size and SHA-256 against the manifest's
    "tables" entry (which the manifest checksum covers), and put its tensors and initializers into `m`."""
    M = MANIFEST
    info = m.get("tables")
    _want(isinstance(info, dict), f"{M}: tables", "missing (version 2 keeps tensors and initializers in tables.json)")
    _keys(info, {"file", "bytes", "sha256"} | _stored_forms(info, m, f"{M}: tables"), f"{M}: tables")
    _want(info["file"] == TABLES, f"{M}: tables.file", f"expected {TABLES!r}")
    _want("tensors" not in m and "initializers" not in m, M,
          "version 2 keeps tensors and initializers in tables.json, not inline")
    step = m["codec"].get("chunk_symbols") if isinstance(m.get("codec"), dict) else None
    if not _check_compressed(path, TABLES, info, f"{M}: tables", step):
        _check_file(path, TABLES, info, f"{M}: tables")
    data = _read_file(path, TABLES, info, step)           # size and SHA-256 of the (decoded) bytes checked
    where = _stored_name(TABLES, info)
    try:
        tables = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise BundleError(f"{where}: not UTF-8 JSON ({e})") from None
    _keys(tables, {"tensors", "initializers"}, where)
    m.update(tables)


def _tables_where(m: dict) -> str:
    """The file the tensor and initializer fields came from, for error messages: as stored (tables.json.zlib ...)."""
    return _stored_name(TABLES, m["tables"]) if "tables" in m and isinstance(m["tables"], dict) else MANIFEST


def _check_stored(folder: Path, fname: str, info: dict, where: str, step):
    """A graph or tokenizer file as the manifest lists it: plain (size + SHA-256), or compressed (the QZ table or
    deflate entry, the compressed file's size, then decoded: size + SHA-256 of what it decodes to)."""
    if isinstance(info, dict) and _check_compressed(folder, fname, info, where, step):
        _read_file(folder, fname, info, step)
    else:
        _check_file(folder, fname, info, where, hash_it=True)


def _check_compressed(folder: Path, fname: str, info: dict, where: str, step) -> bool:
    """A compressed file entry ("qz" or "deflate") and its file's size checked; False when stored plain."""
    if "qz" in info:
        _validate_qz_file(fname, info, step, where)
        _check_file(folder, info["qz"]["file"], info["qz"], f"{where}.qz")
        return True
    if "deflate" in info:
        _validate_deflate_file(fname, info, where)
        _check_file(folder, info["deflate"]["file"], info["deflate"], f"{where}.deflate")
        return True
    return False


def _check_file(folder: Path, fname: str, info: dict, where: str, hash_it: bool = False):
    p = folder / fname
    _want(p.is_file(), where, f"file {fname} is missing")
    size = _int(info.get("bytes"), f"{where}.bytes")
    _want(p.stat().st_size == size, fname, f"{p.stat().st_size} bytes on disk, manifest says {size}")
    if hash_it or fname == GRAPH or fname in GRAPH_VARIANTS.values():
        _want(hashlib.sha256(p.read_bytes()).hexdigest() == info.get("sha256"), fname, "SHA-256 mismatch")


def _validate_initializers(m: dict, cfg: LlamaConfig):
    M = _tables_where(m)
    blob_sizes = [b["bytes"] for b in m["blobs"]]
    step = m["codec"]["chunk_symbols"]
    seen = set()
    for i, e in enumerate(m["initializers"]):
        where = f"{M}: initializers[{i}]"
        _want(isinstance(e, dict) and isinstance(e.get("name"), str), where, "needs a name")
        where = f"{M}: initializer {e['name']}"
        _want(e["name"] not in seen, where, "duplicate name")
        seen.add(e["name"])
        _want(isinstance(e.get("dtype"), str) and e["dtype"] in _DTYPES, f"{where}.dtype", f"expected one of {sorted(_DTYPES)}, got {e.get('dtype')!r}")
        shape = e.get("shape")
        _want(isinstance(shape, list) and 1 <= len(shape) <= 4, f"{where}.shape", "must be a list of 1-4 sizes")
        for d in shape:
            _int(d, f"{where}.shape", 1, 1 << 31)
        nbytes = _int(e.get("nbytes"), f"{where}.nbytes", 1, MAX_INITIALIZER_BYTES)
        _want(nbytes == math.prod(shape) * _DTYPES[e["dtype"]], f"{where}.nbytes", "disagrees with shape and dtype")
        alphabet = _int(e.get("alphabet"), f"{where}.alphabet", 2, 256)
        layout = _int(e.get("layout"), f"{where}.layout", 0, 2)
        _int(e.get("bias"), f"{where}.bias", 0, 255)
        blob = _int(e.get("blob"), f"{where}.blob", 0, len(blob_sizes) - 1) if blob_sizes else \
            _want(False, f"{where}.blob", "bundle has no blobs")
        planes = 1
        if "planes" in e:
            planes = _int(e["planes"], f"{where}.planes", 2, 4)
            _want(planes == _DTYPES[e["dtype"]] and e["dtype"] in ("float16", "float32") and layout == lzw.LAYOUT_U8
                  and alphabet == 256 and e["bias"] == 0, f"{where}.planes",
                  "byte planes are for float16/float32 byte streams (alphabet 256, layout 0, bias 0), one per byte")
        plane_len = nbytes // planes
        chunks = e.get("chunks")
        _want(isinstance(chunks, list) and chunks, f"{where}.chunks", "must be a non-empty list")
        expect_out = 0
        for k, c in enumerate(chunks):
            cw = f"{where}.chunks[{k}]"
            _want(isinstance(c, list) and len(c) == 5, cw, "must be [offset, length, symbols, method, out_offset]")
            off = _int(c[0], f"{cw}.offset")
            length = _int(c[1], f"{cw}.length", lzw.HEADER_SIZE)
            n_sym = _int(c[2], f"{cw}.symbols", 0, 1 << 32)
            _want(c[3] in ("lzw", "packed"), f"{cw}.method", f"expected lzw or packed, got {c[3]!r}")
            _want(_int(c[4], f"{cw}.out_offset") == expect_out, f"{cw}.out_offset",
                  f"expected {expect_out} (chunks must tile the tensor in order)")
            _want(off + length <= blob_sizes[blob], cw,
                  f"bytes [{off}, {off + length}) lie outside blob {blob} of {blob_sizes[blob]} bytes")
            if planes == 1:
                _want(k == len(chunks) - 1 and n_sym <= step or n_sym == step, f"{cw}.symbols",
                      f"every chunk but the last holds codec.chunk_symbols = {step} symbols")
            else:                             # chunks tile each byte plane; none crosses into the next plane
                plane_end = (expect_out // plane_len + 1) * plane_len
                _want(expect_out + n_sym == plane_end and n_sym <= step or
                      expect_out + n_sym < plane_end and n_sym == step, f"{cw}.symbols",
                      f"every chunk but the last of each of the {planes} byte planes holds codec.chunk_symbols = "
                      f"{step} symbols, and no chunk crosses a plane boundary")
            expect_out += lzw.layout_nbytes(layout, n_sym)
        _want(expect_out == nbytes, f"{where}.chunks", f"decode to {expect_out} bytes, tensor needs {nbytes}")


def _validate_tensors(m: dict, cfg: LlamaConfig):
    """The tensor list is exactly the model the config describes, each tensor's scheme is registered and its
    initializers exist; the totals add up."""
    from .loaders import expected_shapes

    M = _tables_where(m)
    want = expected_shapes(cfg)
    inits = {e["name"]: e for e in m["initializers"]}
    names, owned = [], []
    for i, t in enumerate(m["tensors"]):
        where = f"{M}: tensors[{i}]"
        _want(isinstance(t, dict) and isinstance(t.get("name"), str), where, "needs a name")
        name = t["name"]
        _want(name in want, f"{M}: tensor {name!r:.80}", "is not part of a Llama model with this config")
        _want(isinstance(t.get("shape"), list) and all(type(d) is int for d in t["shape"]) and
              t["shape"] == list(want[name]), f"{M}: tensor {name}.shape",
              f"expected {list(want[name])}, got {t.get('shape')!r}")
        _want(isinstance(t.get("scheme"), str), f"{M}: tensor {name}.scheme", "missing or not a string")
        try:
            get_scheme(t["scheme"])
        except TinyQMoEError as e:
            raise BundleError(f"{M}: tensor {name}.scheme: {e}") from None
        ti = t.get("initializers")
        _want(isinstance(ti, list) and ti and all(isinstance(x, str) and x in inits for x in ti),
              f"{M}: tensor {name}.initializers", "must list initializers that exist")
        _want(all(x == name or x.startswith(name + ".") for x in ti), f"{M}: tensor {name}.initializers",
              "lists an initializer of another tensor")
        owned.extend(ti)
        names.append(name)
    _want(sorted(owned) == sorted(inits), f"{M}: tensors",
          "their initializer lists do not cover every initializer exactly once")
    _want(names == list(want), f"{M}: tensors", "do not match the config's tensors (missing, extra or reordered)")
    tot = m.get("totals")
    _want(isinstance(tot, dict), f"{M}: totals", "missing")
    _want(_int(tot.get("runtime_bytes"), f"{M}: totals.runtime_bytes") == sum(e["nbytes"] for e in m["initializers"]),
          f"{M}: totals.runtime_bytes", "is not the sum of the initializers")
    _want(_int(tot.get("blob_bytes"), f"{M}: totals.blob_bytes") == sum(b["bytes"] for b in m["blobs"]),
          f"{M}: totals.blob_bytes", "is not the sum of the blobs")
    _want(_int(tot.get("parameters"), f"{M}: totals.parameters") == sum(math.prod(s) for s in want.values()),
          f"{M}: totals.parameters", "disagrees with the config")


def graph_initializers(m: dict, key: str = "graph") -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of the external initializers the graph `key` reads: the manifest's, except that the
    wasm graph reads the codes its "transposed" table lists, and the scales and zero points its "group_tables"
    table lists, as NAME.kn (and NAME itself only where the table says so)."""
    out = {e["name"]: (e["dtype"], e["shape"]) for e in m["initializers"]}
    by_name = {e["name"]: e for e in m["initializers"]}
    for name, keep in m.get(key, {}).get("transposed", {}).items():
        out[name + KN_SUFFIX] = ("uint8", list(kn_shape(by_name[name]["shape"], by_name[name]["layout"])))
        if not keep:
            del out[name]
    for name, keep in m.get(key, {}).get("group_tables", {}).items():
        codes = by_name[group_table_codes(name)]
        out[name + KN_SUFFIX] = ("float32" if by_name[name]["dtype"] == "float16" else "uint8",
                                 list(group_table_shape(codes["shape"])))
        if not keep:
            del out[name]
    for w in m.get(key, {}).get("block_scales", []):
        n_out, n_blocks = by_name[w + ".q"]["shape"][:2]
        scales, rows, mults = block_scale_parts(w)
        out[scales] = ("float32", [n_out * n_blocks])
        del out[rows], out[mults]
    for name, keep in m.get(key, {}).get("multiplied", {}).items():
        out[name + KN_SUFFIX] = ("int8", list(multiplied_shape(by_name[name]["shape"], by_name[name]["layout"])))
        for part in [name] * (not keep) + list(multiplied_parts(name)):
            out.pop(part, None)
    for name, width in m.get(key, {}).get("pieces", {}).items():     # an int8 (K, N) table above, in pieces
        out[name + PIECES_SUFFIX] = ("int8", list(pieces_shape(out.pop(name)[1], width)))
    return out


def _wasm_graph_table(m: dict, key: str):
    """(name, manifest entry, where) of each entry of the table graph_wasm[key] (name -> bool): an initializer of
    the bundle, true or false."""
    table = m.get("graph_wasm", {}).get(key)
    if table is None:
        return
    where = f"{MANIFEST}: graph_wasm.{key}"
    _want(isinstance(table, dict), where, "expected an object of initializer name -> true/false")
    by_name = {e["name"]: e for e in m["initializers"]}
    for name, keep in table.items():
        e = by_name.get(name)
        _want(e is not None, f"{where}.{name}", "is not an initializer of this bundle")
        _want(type(keep) is bool, f"{where}.{name}", "expected true or false")
        yield name, e, f"{where}.{name}"


def _validate_transposed(m: dict):
    """graph_wasm.transposed: name -> bool, each a 3-D uint8 codes initializer of a packed layout."""
    for _, e, at in _wasm_graph_table(m, "transposed"):
        _want(e["dtype"] == "uint8" and len(e["shape"]) == 3 and e["layout"] in LAYOUT_BITS,
              at, "is not a packed (rows, blocks, bytes) uint8 codes initializer")


def _validate_pieces(m: dict):
    """graph_wasm.pieces: name -> n, each a 2-D int8 (K, N) table (an int8 embedding's (H, V), int8 layer codes)
    or the codes NAME.kn of an entry of graph_wasm.multiplied, whose columns n divides."""
    table = m.get("graph_wasm", {}).get("pieces")
    if table is None:
        return
    where = f"{MANIFEST}: graph_wasm.pieces"
    _want(isinstance(table, dict), where, "expected an object of initializer name -> piece width")
    by_name = {e["name"]: e for e in m["initializers"]}
    multiplied = m["graph_wasm"].get("multiplied") or {}
    for name, width in table.items():
        at = f"{where}.{name}"
        codes = name[:-len(KN_SUFFIX)] if name.endswith(KN_SUFFIX) else None
        if codes is not None and codes in multiplied and codes in by_name:
            cols = multiplied_shape(by_name[codes]["shape"], by_name[codes]["layout"])[1]
        else:
            e = by_name.get(name)
            _want(e is not None, at, "is not an initializer of this bundle nor the codes of graph_wasm.multiplied")
            _want(e["dtype"] == "int8" and len(e["shape"]) == 2, at, "is not a 2-D int8 table")
            cols = e["shape"][1]
        _want(type(width) is int and 0 < width and cols % width == 0, at,
              f"piece width {width!r} does not divide its {cols} columns")


def _validate_block_scales(m: dict):
    """graph.block_scales / graph_fp16.block_scales: a list of int4-mG weights NAME, each with its packed codes,
    float16 row scales (one per row) and packed multipliers (one per group)."""
    by_name = {e["name"]: e for e in m["initializers"]}
    for key in ("graph", "graph_fp16"):
        weights = m.get(key, {}).get("block_scales")
        if weights is None:
            continue
        where = f"{MANIFEST}: {key}.block_scales"
        _want(isinstance(weights, list) and all(isinstance(w, str) for w in weights), where,
              "expected a list of weight names")
        for w in weights:
            codes, (_, rows_name, mults_name) = by_name.get(w + ".q"), block_scale_parts(w)
            _want(codes is not None and codes["dtype"] == "uint8" and len(codes["shape"]) == 3 and
                  codes["layout"] in LAYOUT_BITS, f"{where}: {w}", "has no packed codes initializer")
            rows, blocks, _ = codes["shape"]
            per = 8 // LAYOUT_BITS[codes["layout"]]
            r, mu = by_name.get(rows_name), by_name.get(mults_name)
            _want(r is not None and r["dtype"] == "float16" and r["nbytes"] == 2 * rows, f"{where}: {w}",
                  f"needs {rows_name}: one float16 scale per row ({rows})")
            _want(mu is not None and mu["dtype"] == "uint8" and mu["nbytes"] == rows * -(-blocks // per),
                  f"{where}: {w}", f"needs {mults_name}: one packed multiplier per group ({rows} x {blocks})")


def _validate_multiplied(m: dict):
    """graph_wasm.multiplied: name -> bool, each the packed uint8 codes of an int4-mG weight whose zero points and
    multipliers (NAME.zeros, NAME.mults: one packed value per group) the bundle holds."""
    by_name = {e["name"]: e for e in m["initializers"]}
    for name, e, at in _wasm_graph_table(m, "multiplied"):
        _want(e["dtype"] == "uint8" and len(e["shape"]) == 3 and e["layout"] in LAYOUT_BITS and name.endswith(".q"),
              at, "is not a packed (rows, blocks, bytes) uint8 codes initializer")
        rows, blocks, _ = e["shape"]
        per = 8 // LAYOUT_BITS[e["layout"]]
        for part in multiplied_parts(name):
            p = by_name.get(part)
            _want(p is not None and p["dtype"] == "uint8" and p["nbytes"] == rows * -(-blocks // per), at,
                  f"needs {part}: one packed value per group ({rows} rows x {blocks} groups)")


def _validate_group_tables(m: dict):
    """graph_wasm.group_tables: name -> bool, each the float16 scales or the packed uint8 zero points of a codes
    initializer the transposed table lists, sized for its (rows, blocks) groups."""
    by_name = {e["name"]: e for e in m["initializers"]}
    transposed = m.get("graph_wasm", {}).get("transposed") or {}
    for name, e, at in _wasm_graph_table(m, "group_tables"):
        codes = group_table_codes(name)
        _want(name.endswith((".scales", ".zeros")) and codes in transposed, at,
              "is not the scales or zeros of a codes initializer in graph_wasm.transposed")
        rows, blocks, _ = by_name[codes]["shape"]
        if name.endswith(".scales"):
            ok = e["dtype"] == "float16" and e["nbytes"] == 2 * rows * blocks
        else:
            per = 8 // LAYOUT_BITS[by_name[codes]["layout"]]
            ok = e["dtype"] == "uint8" and e["nbytes"] == rows * -(-blocks // per)
        _want(ok, at, f"does not hold one value per group of {codes} ({rows} rows x {blocks} groups)")


def _validate_graph(path: Path, m: dict, fname: str):
    """The graph's external initializers are exactly the manifest's, with the same dtypes and shapes."""
    import onnx
    from onnx import TensorProto

    dtypes = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT8: "int8",
              TensorProto.UINT8: "uint8"}
    try:
        key = "graph" if fname == GRAPH else {f: k for k, f in GRAPH_VARIANTS.items()}[fname]
        model = onnx.load_from_string(_read_file(path, fname, m[key], m["codec"]["chunk_symbols"]))
    except Exception as e:  # protobuf raises its own DecodeError family
        raise BundleError(f"{fname}: not a readable ONNX model ({type(e).__name__})") from None
    graph = {t.name: (dtypes.get(t.data_type, str(t.data_type)), list(t.dims)) for t in model.graph.initializer
             if t.data_location == TensorProto.EXTERNAL}
    _validate_graph_constants(model, LlamaConfig.from_dict(m["config"]), fname)
    manifest = graph_initializers(m, key)
    T = _tables_where(m)
    for name in sorted(set(graph) | set(manifest)):
        _want(name in manifest, f"{T}: initializers", f"{fname} needs {name}, which is not listed")
        _want(name in graph, f"{T}: initializer {name}", f"is not used by {fname}")
        _want(graph[name] == manifest[name], f"{T}: initializer {name}",
              f"is {manifest[name]} but {fname} expects {graph[name]}")


# ---- field-by-field schema: exact key sets, types and sane ranges (the checksum stops accidents; this stops lies)

_TOP = {"format", "version", "codec", "name", "producer", "source", "scheme", "embed_scheme", "config", "graph",
        "tokenizer", "blobs", "tensors", "initializers", "totals", "integrity"}
_CONFIG = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
           "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
           "tie_word_embeddings", "head_dim", "bos_token_id", "eos_token_ids", "rope_freq_factors"}
_TENSOR = {"name", "shape", "source_dtype", "scheme", "max_error", "rms_error", "initializers"}
_INIT = {"name", "dtype", "shape", "nbytes", "alphabet", "layout", "bias", "blob", "entropy_bits", "stored_bytes",
         "chunks"}
_INIT_OPTIONAL = {"planes"}
_TOTALS = {"parameters", "float32_bytes", "runtime_bytes", "blob_bytes", "bundle_bytes", "bits_per_weight_blobs",
           "bits_per_weight_all_in"}


def _keys(obj, want: set, where: str):
    _want(isinstance(obj, dict), where, "must be an object")
    missing, extra = sorted(want - set(obj)), sorted(set(obj) - want)
    _want(not missing, where, f"missing field(s) {', '.join(missing)}")
    _want(not extra, where, f"unexpected field(s) {', '.join(map(str, extra))}")


def _num(v, where: str, lo: float, hi: float) -> float:
    _want(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi, where,
          f"expected a number in [{lo}, {hi}], got {v!r}")
    return v


def _str(v, where: str) -> str:
    _want(isinstance(v, str) and 0 < len(v) <= 4096, where, f"expected a non-empty string, got {v!r:.60}")
    return v


def _validate_schema(m: dict):
    M = MANIFEST
    _keys(m, _TOP | (({"calibration", "smoothing", "warmup"} | set(GRAPH_VARIANTS)) & set(m)) |
          ({"tables"} if m["version"] >= 2 else set()), M)
    for key in GRAPH_VARIANTS:
        if key in m:
            tables = {"graph_wasm": {"transposed", "group_tables", "multiplied", "pieces"},
                      "graph_fp16": {"block_scales"}}
            optional = _stored_forms(m[key], m, f"{M}: {key}") | \
                (tables[key] & set(m[key] if isinstance(m[key], dict) else ()))
            _keys(m[key], {"file", "bytes", "sha256"} | optional, f"{M}: {key}")
    if "calibration" in m:
        _validate_calibration(m["calibration"])
    if "smoothing" in m:
        sm = m["smoothing"]
        auto = isinstance(sm, dict) and sm.get("alpha") == "auto"
        _want(isinstance(sm, dict) and set(sm) == {"alpha", "tokens", "text"} | ({"chosen"} if auto else set()),
              f"{M}: smoothing", "expected alpha, tokens and text (and chosen when alpha is auto)")
        if auto:
            ch = sm["chosen"]
            _want(isinstance(ch, dict) and len(ch) <= 16 and all(isinstance(k, str) and len(k) <= 8 and type(v) is int
                                                               and 0 <= v < 1 << 20 for k, v in ch.items()),
                  f"{M}: smoothing.chosen", "expected candidate -> count")
        else:
            _num(sm["alpha"], f"{M}: smoothing.alpha", 0, 1)
        _int(sm["tokens"], f"{M}: smoothing.tokens", 1, 1 << 24)
        _want(isinstance(sm["text"], dict) and len(json.dumps(sm["text"])) < 4096, f"{M}: smoothing.text",
              "expected a short object")
    _keys(m["codec"], {"name", "version", "chunk_symbols", "max_code_bits"}, f"{M}: codec")
    _want(m["codec"]["name"] == "qz" and type(m["codec"]["version"]) is int and m["codec"]["version"] == 1,
          f"{M}: codec", "expected qz version 1")
    _int(m["codec"]["chunk_symbols"], f"{M}: codec.chunk_symbols", 4, 1 << 32)
    _int(m["codec"]["max_code_bits"], f"{M}: codec.max_code_bits", lzw.MIN_CODE_BITS, lzw.MAX_CODE_BITS)
    _str(m["name"], f"{M}: name")
    _str(m["producer"], f"{M}: producer")
    _keys(m["source"], {"file", "kind"}, f"{M}: source")
    _str(m["source"]["file"], f"{M}: source.file")
    _want(m["source"]["kind"] in ("hf", "gguf"), f"{M}: source.kind", f"expected hf or gguf, got {m['source']['kind']!r}")
    c = m["config"]
    _keys(c, _CONFIG, f"{M}: config")
    for k in ("rms_norm_eps", "rope_theta"):
        _num(c[k], f"{M}: config.{k}", 1e-12, 1e12)
    _want(isinstance(c["tie_word_embeddings"], bool), f"{M}: config.tie_word_embeddings", "must be true or false")
    vocab = _int(c["vocab_size"], f"{M}: config.vocab_size", 1, 1 << 24)
    # bounds far above any Llama (3.1-405B: 126 layers, hidden 16384, MLP 53248, 128 heads)
    for k, hi in (("num_hidden_layers", 1024), ("hidden_size", 1 << 17), ("intermediate_size", 1 << 20),
                  ("num_attention_heads", 1024), ("num_key_value_heads", 1024), ("head_dim", 4096),
                  ("max_position_embeddings", 1 << 24)):
        _int(c[k], f"{M}: config.{k}", 1, hi)
    n_tensors = 2 + 9 * c["num_hidden_layers"] + (0 if c["tie_word_embeddings"] else 1)
    T = _tables_where(m)
    _want(isinstance(m["tensors"], list) and len(m["tensors"]) == n_tensors, f"{T}: tensors",
          f"a model of {c['num_hidden_layers']} layers has {n_tensors} tensors")
    if c["bos_token_id"] is not None:
        _int(c["bos_token_id"], f"{M}: config.bos_token_id", 0, vocab - 1)
    _want(isinstance(c["eos_token_ids"], list) and c["eos_token_ids"], f"{M}: config.eos_token_ids",
          "must be a non-empty list (a chat model needs an end-of-sequence token)")
    for e in c["eos_token_ids"]:
        _int(e, f"{M}: config.eos_token_ids", 0, vocab - 1)
    if c["rope_scaling"] is not None:
        rs = c["rope_scaling"]
        _keys(rs, {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
              f"{M}: config.rope_scaling")
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            _num(rs[k], f"{M}: config.rope_scaling.{k}", 1e-6, 1e6)
        _int(rs["original_max_position_embeddings"], f"{M}: config.rope_scaling.original_max_position_embeddings", 1)
    if c["rope_freq_factors"] is not None:
        _want(isinstance(c["rope_freq_factors"], list) and isinstance(c["head_dim"], int) and
              len(c["rope_freq_factors"]) == c["head_dim"] // 2, f"{M}: config.rope_freq_factors",
              "must be a list of head_dim / 2 factors")
        for f in c["rope_freq_factors"]:
            _num(f, f"{M}: config.rope_freq_factors", 1e-6, 1e6)
    _keys(m["graph"], {"file", "bytes", "sha256"} | _stored_forms(m["graph"], m, f"{M}: graph") |
          ({"block_scales"} & set(m["graph"] if isinstance(m["graph"], dict) else ())), f"{M}: graph")
    for name, info in (m["tokenizer"].items() if isinstance(m["tokenizer"], dict) else []):
        _keys(info, {"bytes", "sha256"} | _stored_forms(info, m, f"{M}: tokenizer.{name}"), f"{M}: tokenizer.{name}")
    for i, b in enumerate(m["blobs"] if isinstance(m["blobs"], list) else []):
        _keys(b, {"file", "bytes", "sha256"}, f"{M}: blobs[{i}]")
    for i, t in enumerate(m["tensors"] if isinstance(m["tensors"], list) else []):
        w = f"{T}: tensors[{i}]"
        _keys(t, _TENSOR, w)
        _str(t["source_dtype"], f"{w}.source_dtype")
        _num(t["max_error"], f"{w}.max_error", 0, 1e4)
        _num(t["rms_error"], f"{w}.rms_error", 0, 1e4)
    for i, e in enumerate(m["initializers"] if isinstance(m["initializers"], list) else []):
        w = f"{T}: initializers[{i}]"
        _keys(e, _INIT | (_INIT_OPTIONAL & set(e if isinstance(e, dict) else ())), w)
        _num(e["entropy_bits"], f"{w}.entropy_bits", 0, 8)
        chunks = e["chunks"] if isinstance(e["chunks"], list) else []
        lengths = [c[1] if isinstance(c, list) and len(c) == 5 else None for c in chunks]
        _want(all(isinstance(x, int) and not isinstance(x, bool) for x in lengths), f"{w}.chunks",
              "every chunk must be [offset, length, symbols, method, out_offset] with integer length")
        _want(type(e["stored_bytes"]) is int and e["stored_bytes"] == sum(lengths), f"{w}.stored_bytes",
              "is not the sum of its chunk lengths")
    t = m["totals"]
    _keys(t, _TOTALS, f"{M}: totals")
    _want(_int(t["float32_bytes"], f"{M}: totals.float32_bytes") == 4 * _int(t["parameters"], f"{M}: totals.parameters"),
          f"{M}: totals.float32_bytes", "is not 4 bytes per parameter")
    _int(t["bundle_bytes"], f"{M}: totals.bundle_bytes", 1)
    for k in ("bits_per_weight_blobs", "bits_per_weight_all_in"):
        _num(t[k], f"{M}: totals.{k}", 0, 64)


def _validate_calibration(c):
    """Informational (how the codes were chosen), but still typed: method, sizes and the mixed-precision record."""
    from .calibrate import METHODS

    w = f"{MANIFEST}: calibration"
    _want(isinstance(c, dict) and c.get("method") in METHODS, f"{w}.method", f"expected one of {', '.join(METHODS)}")
    for k in ("sequences", "seq_len", "block"):
        _int(c.get(k), f"{w}.{k}", 1, 1 << 24)
    _num(c.get("damp"), f"{w}.damp", 0, 1)
    _want(isinstance(c.get("act_order", False), bool), f"{w}.act_order", "must be true or false")
    if "fisher_rows" in c:
        f = c["fisher_rows"]
        _want(isinstance(f, dict) and isinstance(f.get("kinds"), list) and all(isinstance(k, str) for k in f["kinds"]),
              f"{w}.fisher_rows", "needs a list of the kinds of matrix weighted")
        _num(f.get("beta"), f"{w}.fisher_rows.beta", 0, 4)
    _want(len(json.dumps(c)) < 1 << 16, w, "is too large")
    if "mixed" in c:
        mixed = c["mixed"]
        _want(isinstance(mixed, dict) and isinstance(mixed.get("promoted"), list) and
              all(isinstance(x, str) for x in mixed["promoted"]), f"{w}.mixed", "needs a list of promoted tensors")
        try:
            get_scheme(_str(mixed.get("high"), f"{w}.mixed.high"))
        except TinyQMoEError as e:
            raise BundleError(f"{w}.mixed.high: {e}") from None


def _validate_graph_constants(model, cfg: LlamaConfig, fname: str = GRAPH):
    """Config values the graph bakes in as constants (RoPE frequencies incl. llama3 scaling, RMSNorm epsilon) must
    be the manifest's: a manifest that lies about them would describe a different model than the one that runs."""
    from onnx import numpy_helper

    from .config import rope_inv_freq

    consts = {t.name: t for t in model.graph.initializer if t.data_location != 1}
    nodes = {n.name: n for n in model.graph.node}

    def const_of(node_name: str, index: int):
        node = nodes.get(node_name)
        _want(node is not None and len(node.input) > index and node.input[index] in consts, fname,
              f"node {node_name} is missing or has no constant input {index}")
        return numpy_helper.to_array(consts[node.input[index]])

    freqs = const_of("/model/rotary_emb/Freqs", 1)
    want = np.asarray(rope_inv_freq(cfg), np.float32)
    _want(freqs.shape == want.shape and np.array_equal(freqs, want), fname,
          "RoPE frequencies differ from the manifest config (rope_theta / rope_scaling / head_dim)")
    fused = nodes.get("/model/norm")           # float32 graphs: SkipSimplifiedLayerNormalization, eps an attribute
    if fused is not None and fused.op_type == "SkipSimplifiedLayerNormalization":
        from onnx import helper
        eps = [helper.get_attribute_value(a) for a in fused.attribute if a.name == "epsilon"]
        ok = len(eps) == 1 and float(np.float32(eps[0])) == float(np.float32(cfg.rms_norm_eps))
    else:
        eps = const_of("/model/norm/AddEps", 1)
        ok = eps.shape == () and float(eps) == float(np.float32(cfg.rms_norm_eps))
    _want(ok, fname, "RMSNorm epsilon differs from the manifest config")
