"""The only Python module that imports onnxruntime: a bundle's graph + decoded weights -> a running session.

Decoded weights go straight from the LZW chunks into numpy buffers that onnxruntime borrows — nothing is written to
disk and nothing is expanded to fp32.

Each initializer is external data in the graph (location = its own name, offset 0), so every decoded buffer is handed
over as the in-memory "file" of that name (`add_external_initializers_from_files_in_memory`). By default onnxruntime
copies those files while the session is created — for a moment the process then holds our buffers, that copy and
the kernels' prepacked weights, ~3x the weights (SmolLM2 int8, onnxruntime 1.32: peak RSS 422-473 MiB for 135 MB of
weights). With "session.use_external_initializer_file_buffers_directly" it uses them in place instead (same kernels,
same prepacking, bit-identical logits; peak 410 MiB including a 64-token prefill), and the caller must keep them alive
and unchanged for as long as the session exists: `create_session` ties them to the session object.
"""
from __future__ import annotations

import numpy as np

from .bundle import Bundle
from .errors import TinyQMoEError
from .layouts import (KN_SUFFIX, PIECES_SUFFIX, block_scale_parts, block_scales, column_pieces, kn_initializer,
                      kn_tables, multiplied_codes, multiplied_parts)
from .onnx_export import LOGITS_TO_KEEP, kv_names
from .runtime.generate import TOP_CANDIDATES

PROVIDERS = {"cpu": "CPUExecutionProvider"}
BORROW_BUFFERS = "session.use_external_initializer_file_buffers_directly"  # onnxruntime session config key


INT8_COMPUTE = 4      # MatMulNBits accuracy_level: int8 activations (onnxruntime's CompInt8 kernels)


def set_int8_compute(model) -> int:
    """Let every MatMulNBits of an onnx ModelProto multiply in int8 (accuracy_level 4): onnxruntime CPU quantizes
    the activations per block of the weights' group, symmetric int8, and runs integer kernels (AVX-512 VNNI / AVX2
    here) instead of dequantizing the weights to float32. Measured, 1 thread (README): SmolLM2 int4-g32 decode
    90.7 -> 123.0 tok/s, Llama-3.2-1B-shaped int4-g32 13 -> 26.7 tok/s; the price is +26 MiB of prepacked block
    sums and scales for SmolLM2 and numerics like the int8 schemes' (activations rounded to 8 bits). Returns how many
    nodes changed; the bundle's graph is left as it is (model.onnx stays float compute for every EP)."""
    from onnx import helper

    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("accuracy_level", INT8_COMPUTE))
            n += 1
    return n


HALVES = {".hi4": "high", ".lo4": "low"}     # NAME.q + suffix: the packed 4-bit halves of 8-bit group codes
SPLIT_MARK = b"/high/MatMulNBits"             # in the serialized graph when it has 8-bit group linears


def split_8bit_codes(model) -> int:
    """Rewrite a graph's 8-bit group linears (onnx_export.nbits8_linear: int8-g32, int8-eB, q8_0) so that their two
    4-bit MatMulNBits read the packed halves as initializers NAME.q.hi4 / NAME.q.lo4, which the loaders make
    (eight_bit_half), instead of the BitShift / BitwiseAnd / Split / BitwiseOr subgraph over the codes. onnxruntime
    folds that subgraph when the session is created, and its intermediates cost ~9 bytes per weight at once:
    SmolLM2 int8-e3.2 everywhere peaked at 1,494 MiB while its session was created (docs/runtime.md). The same
    bytes either way (a test compares the logits). Nodes and initializers no longer read are dropped (the codes
    stay when an embedding's Gather reads them). Returns how many halves were rewritten."""
    from onnx import TensorProto

    g = model.graph
    nodes = {n.name: n for n in g.node}
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    n_split = 0
    for node in list(g.node):
        for suffix, half in HALVES.items():
            tail = f"/{half}/MatMulNBits"
            if node.op_type != "MatMulNBits" or not node.name.endswith(tail):
                continue
            prefix = node.name[:-len(tail)]
            first = nodes.get(f"{prefix}/{half}/" + ("Shift" if half == "high" else "Mask"))
            squeeze = producer.get(node.input[1])
            if first is None or squeeze is None or squeeze.name != f"{prefix}/{half}/Squeeze" or \
                    first.input[0] not in inits:
                continue
            codes = inits[first.input[0]]
            n, nb, block = codes.dims
            name = codes.name + suffix
            if name not in inits:
                t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[n, nb, block // 2],
                                data_location=TensorProto.EXTERNAL)
                for k, v in (("location", name), ("offset", "0"), ("length", str(n * nb * block // 2))):
                    t.external_data.add(key=k, value=v)
                g.initializer.append(t)
                inits[name] = t
            node.input[1] = name
            n_split += 1
    if n_split:                                  # drop what nothing reads any more
        outputs = {o.name for o in g.output}
        while True:
            read = {i for n in g.node for i in n.input} | outputs
            dead = [n for n in g.node if not any(o in read for o in n.output)]
            if not dead:
                break
            for n in dead:
                g.node.remove(n)
        read = {i for n in g.node for i in n.input}
        for t in [t for t in g.initializer if t.name not in read]:
            g.initializer.remove(t)
    return n_split


def eight_bit_half(codes: np.ndarray, name: str, dims) -> np.ndarray:
    """The initializer NAME.q.hi4 or NAME.q.lo4 (split_8bit_codes) from NAME.q's stored codes (uint8 [N, nb, b]):
    their high or low nibbles packed two per byte, element 2j in the low nibble, exactly as the subgraph it
    replaces computes them."""
    n, nb, hb = (int(d) for d in dims)
    pairs = np.asarray(codes, np.uint8).reshape(n, nb, hb, 2)
    nib = pairs >> 4 if name.endswith(".hi4") else pairs & 15
    return (nib[..., 0] | (nib[..., 1] << 4)).astype(np.uint8)


def graph_model(bundle: Bundle, float16: bool, variant: str, int8_compute: bool, kv_inplace: bool = False,
                split8: bool = True):
    """The bundle's graph as an onnx ModelProto, its 8-bit group codes split by the loader (split_8bit_codes; not
    with split8=False), with int8 compute when asked (set_int8_compute) and rewritten for a KV cache written in
    place (kv_inplace.inplace_kv_graph). The staged sessions cut this model into stages."""
    import onnx
    model = onnx.load_from_string(bundle.graph_bytes(float16, variant))
    if split8:
        split_8bit_codes(model)
    if int8_compute:
        set_int8_compute(model)
    if kv_inplace:
        from .kv_inplace import inplace_kv_graph
        inplace_kv_graph(model, bundle.config)
    return model


def create_session(bundle: Bundle, threads: int = 1, verify: bool = True, float16: bool = False, variant: str = "graph",
                   int8_compute: bool = False, kv_inplace: bool = False, split8: bool = True):
    """An onnxruntime CPU session over the bundle's decoded weights. variant: which graph runs ("graph" = model.onnx,
    "graph_fp16", "graph_wasm"; bundle.GRAPH_VARIANTS); float16=True is variant="graph_fp16"; int8_compute:
    set_int8_compute; kv_inplace: the graph rewritten around GroupQueryAttention (kv_inplace.py); split8: 8-bit
    group codes split into their 4-bit halves here, not by onnxruntime's constant folding (split_8bit_codes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    names, arrays = [], []
    variant = "graph_fp16" if float16 else variant
    graph = getattr(bundle, "manifest", {}).get(variant, {})
    kn = kn_tables(graph)                                     # wasm graph: NAME.kn -> NAME read too
    multiplied = graph.get("multiplied", {})                 # ... and int4-mG's int8 codes, from three initializers
    parts = {p: c for c in multiplied for p in (c, *multiplied_parts(c))}
    scaled = {p: w for w in graph.get("block_scales", []) for p in block_scale_parts(w)[1:]}   # int4-mG, model.onnx
    held: dict[str, np.ndarray] = {}
    entries = {e["name"]: e for e in getattr(bundle, "initializers", [])}
    graph_raw = bundle.graph_bytes(float16, variant)
    halves: dict[str, list] = {}                            # NAME.q -> its split halves (split_8bit_codes)
    wanted = None                                           # the initializers the graph reads, when split
    split = split8 and SPLIT_MARK in graph_raw
    if int8_compute or kv_inplace or split:
        model = graph_model(bundle, float16, variant, int8_compute, kv_inplace, split8)
        graph_raw = model.SerializeToString()
        if split:
            wanted = {t.name for t in model.graph.initializer}
        for t in model.graph.initializer:
            if t.name[-4:] in HALVES:
                halves.setdefault(t.name[:-4], []).append((t.name, list(t.dims)))
    pieces = graph.get("pieces", {})                 # wasm graph: int8 (K, N) tables read as NAME.pieces
    for entry, arr in bundle.decode_initializers(verify=verify):
        name = entry["name"]
        if name in pieces:
            names.append(name + PIECES_SUFFIX)
            arrays.append(column_pieces(arr, pieces[name]))
            continue
        for half, dims in halves.get(name, []):
            names.append(half)
            arrays.append(eight_bit_half(arr, half, dims))
        if wanted is not None and name not in wanted and name not in parts and name not in scaled and name not in kn:
            continue
        if name in scaled:                                   # NAME.scales = row scales × multipliers
            held[name] = arr
            scales, rows, mults = block_scale_parts(scaled[name])
            if rows in held and mults in held:
                codes = entries[scaled[name] + ".q"]
                names.append(scales)
                arrays.append(block_scales(held.pop(rows), held.pop(mults), codes["shape"], codes["layout"]))
            continue
        if name in parts:
            held[name] = arr
            codes = parts[name]
            if all(p in held for p in (codes, *multiplied_parts(codes))):
                zeros, mults = (held.pop(p) for p in multiplied_parts(codes))
                kn = multiplied_codes(held[codes], zeros, mults, entries[codes]["layout"])
                if codes + KN_SUFFIX in pieces:                 # the wasm graph's layers read them in pieces
                    names.append(codes + KN_SUFFIX + PIECES_SUFFIX)
                    arrays.append(column_pieces(kn, pieces[codes + KN_SUFFIX]))
                else:
                    names.append(codes + KN_SUFFIX)
                    arrays.append(kn)
                if multiplied[codes]:
                    names.append(codes)
                    arrays.append(np.ascontiguousarray(held[codes]))
                del held[codes]
            continue
        if name in kn:
            names.append(name + KN_SUFFIX)
            arrays.append(kn_initializer(name, arr, entries))
            if not kn[name]:
                continue
        names.append(name)
        arrays.append(np.ascontiguousarray(arr))
    if not hasattr(so, "add_external_initializers_from_files_in_memory"):
        # older onnxruntime without the Python binding for in-memory files: it copies the OrtValues, ours can go
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
        return ort.InferenceSession(graph_raw, so, providers=[PROVIDERS["cpu"]])
    so.add_session_config_entry(BORROW_BUFFERS, "1")
    files = [a.reshape(-1).view(np.uint8) for a in arrays]                   # the raw bytes of each "file"
    so.add_external_initializers_from_files_in_memory(names, files, [f.nbytes for f in files])
    sess = ort.InferenceSession(graph_raw, so, providers=[PROVIDERS["cpu"]])
    # onnxruntime reads the borrowed buffers as long as the session runs but holds no reference to them (without
    # this attribute the next run reads freed memory); weights it prepacked are read only once, but which those are
    # is onnxruntime's business, so all of them live and die with the session
    sess._borrowed_initializers = files
    return sess


class OrtDecoder:
    """The runtime's session interface (see runtime/generate.py) over an onnxruntime CPU session.

    Holds the KV cache between calls; `forward_full` returns all positions' logits (evaluation uses it).
    low_memory: run the graph as a chain of sessions over stages of layers (converter/ort_stages.py); "strict": the
    same, with a tied embedding held once, unpacked (slower lm_head; ort_stages.STRICT). int8_compute: the group
    schemes' MatMulNBits multiply in int8 (set_int8_compute: faster, a little more memory, float32 graphs only).
    kv: "concat" (the bundle's graph: each step appends to a copy of the cache) or "inplace" (kv_inplace.py: one
    cache of doubling capacity written in place; batch 1 without padding, model.onnx, one session or stages).
    """

    def __init__(self, bundle: Bundle, threads: int = 1, verify: bool = True, float16: bool = False,
                 variant: str = "graph", low_memory: bool | str = False, int8_compute: bool = False,
                 kv: str = "concat"):
        self.config = bundle.config
        self.int8_compute = int8_compute
        float16 = float16 or variant == "graph_fp16"
        if int8_compute and float16:      # CompInt8 takes float32 activations
            raise TinyQMoEError("int8 compute runs the float32 graphs only (model.onnx)")
        if kv not in ("concat", "inplace"):
            raise TinyQMoEError(f"kv: 'concat' or 'inplace', not {kv!r}")
        inplace = kv == "inplace"
        if inplace and (float16 or variant != "graph"):
            raise TinyQMoEError("the in-place KV cache runs model.onnx (not the float16 or the wasm graph)")
        if low_memory:   # a session per stage of layers, created in turn: less memory, a little slower (ort_stages.py)
            from .ort_stages import create_staged_session
            if float16:  # float16 tensors between stages are rounded where one session keeps float32: not the same
                raise TinyQMoEError("low-memory mode runs the float32 graphs only (model.onnx, model.wasm.onnx)")
            if low_memory not in (True, "strict"):
                raise TinyQMoEError(f"low_memory: True or 'strict', not {low_memory!r}")
            self.session = create_staged_session(bundle, threads, verify, variant, strict=low_memory == "strict",
                                                 int8_compute=int8_compute, kv_inplace=inplace)
        else:
            self.session = create_session(bundle, threads, verify, float16, variant, int8_compute, kv_inplace=inplace)
        self.inplace = None
        if inplace:
            from .kv_inplace import InplaceCache
            self.inplace = InplaceCache(self.session, self.config)
        # the KV cache's type as the graph declares it: float16 in the float16 graph and in the wasm graph
        self.kv_dtype = _kv_dtype(self.session)
        # the wasm graph's cache is position-major and its present holds only the new positions, which are appended
        # here (onnx_export.attention_append); the other graphs return the whole cache, heads first
        self.kv_append = _kv_append(self.session)
        # bundles built before session 3 have no num_logits_to_keep input: they always return every position
        self.has_logits_to_keep = LOGITS_TO_KEEP in {i.name for i in self.session.get_inputs()}
        self.reset()

    def reset(self, batch: int = 1) -> None:
        c = self.config
        if self.inplace is not None:
            if batch != 1:
                raise TinyQMoEError("the in-place KV cache holds one sequence (batch 1)")
            self.inplace.reset()
            self.tokens = []
            return
        shape = (batch, 0, c.num_key_value_heads, c.head_dim) if self.kv_append else \
            (batch, c.num_key_value_heads, 0, c.head_dim)
        empty = np.zeros(shape, self.kv_dtype)
        self.past = {n: empty for i in range(c.num_hidden_layers) for n in kv_names(i)[:2]}
        self.mask = np.zeros((batch, 0), np.int64)
        self.tokens: list[int] = []        # the ids the cache holds (batch 1; runtime/generate.py reuses a prefix)

    def rewind(self, n: int) -> None:
        """Keep the cache of the first n tokens only (batch 1): the next run continues from position n."""
        if self.inplace is not None:
            self.inplace.rewind(n)
            del self.tokens[n:]
            return
        if not 0 <= n <= self.cached or self.mask.shape[0] != 1:
            raise ValueError(f"cannot rewind a cache of {self.cached} positions (batch {self.mask.shape[0]}) to {n}")
        if n == 0:
            self.reset()
            return
        self.past = {k: np.ascontiguousarray(v[:, :n] if self.kv_append else v[:, :, :n]) for k, v in self.past.items()}
        self.mask = self.mask[:, :n]
        del self.tokens[n:]

    @property
    def cached(self) -> int:
        return self.inplace.length if self.inplace is not None else self.mask.shape[1]

    def run(self, ids: np.ndarray, mask_new: np.ndarray | None = None, last_only: bool = False,
            keep: int = 0) -> np.ndarray:
        """ids [B, S] after the cache; returns logits [B, S, V] (last_only: [B, 1, V], the lm_head on the last
        position only; keep=n: [B, n, V], the last n positions) and extends the cache."""
        B, S = ids.shape
        keep = 1 if last_only else keep
        if self.inplace is not None:
            if B != 1 or (mask_new is not None and not np.all(mask_new)):
                raise TinyQMoEError("the in-place KV cache runs one sequence without padding (batch 1)")
            start = self.inplace.length
            logits = self.inplace.run({"input_ids": ids.astype(np.int64),
                                       "position_ids": np.arange(start, start + S, dtype=np.int64)[None],
                                       LOGITS_TO_KEEP: np.array(keep, np.int64)})
            self.tokens += [int(t) for t in ids[0]]
            return logits
        if mask_new is None:
            mask_new = np.ones((B, S), np.int64)
        mask = np.concatenate([self.mask, mask_new.astype(np.int64)], axis=1)
        # positions count only attended tokens, so left padding does not shift a row's positions
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -S:]
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask, "position_ids": pos.astype(np.int64)}
        if self.has_logits_to_keep:
            feeds[LOGITS_TO_KEEP] = np.array(keep, np.int64)
        feeds.update(self.past)
        out = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        res = dict(zip(names, out))
        c = self.config
        for i in range(c.num_hidden_layers):
            pk, pv, ck, cv = kv_names(i)
            if self.kv_append:
                self.past[pk] = np.concatenate([self.past[pk], res[ck]], axis=1)
                self.past[pv] = np.concatenate([self.past[pv], res[cv]], axis=1)
            else:
                self.past[pk], self.past[pv] = res[ck], res[cv]
        self.mask = mask
        if B == 1:
            self.tokens += [int(t) for t in ids[0]]
        return res["logits"]

    def forward(self, ids: list[int], k: int = TOP_CANDIDATES) -> tuple[list[int], list[float]]:
        """The runtime's interface: the top-k logits of the last position, by (value desc, id asc)."""
        return top_k_sorted(self.run(np.asarray([ids], np.int64), last_only=True)[0, -1], k)

    def forward_positions(self, ids: list[int], n: int, k: int = TOP_CANDIDATES) -> list[tuple[list[int], list[float]]]:
        """The top-k logits of each of the last n positions, in order (a step that checks draft tokens:
        runtime/generate.py, SamplingConfig.lookahead)."""
        logits = self.run(np.asarray([ids], np.int64), keep=n)[0]
        return [top_k_sorted(row, k) for row in logits[-n:]]

    def forward_full(self, ids: list[int]) -> np.ndarray:
        self.reset()
        return self.run(np.asarray([ids], np.int64))[0]


def session_weight_bytes(bundle: Bundle, variant: str = "graph") -> int:
    """Bytes of the weights an onnxruntime session of the graph `variant` holds: the initializers it is given (the
    bundle's, with the tables the loaders make instead of theirs: bundle.graph_initializers), each one that only
    Casts read counted in the type it is cast to — onnxruntime folds Cast(initializer) into a new initializer when
    it creates the session (e.g. int4-gG's float16 scales, which MatMulNBits takes as float32), and one that other
    nodes read as well counted in both types. What the memory targets divide by: the stored bytes
    (totals.runtime_bytes) would make a smaller storage type of the same weights look like a worse runtime."""
    import onnx
    from onnx import helper

    from .bundle import graph_initializers

    types = graph_initializers(bundle.manifest, variant)
    model = onnx.load_from_string(bundle.graph_bytes(variant=variant))
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in types:
                readers.setdefault(name, []).append(node)
    total = 0
    for name, (dtype, shape) in types.items():
        n = int(np.prod(shape)) if shape else 1
        casts = [node for node in readers.get(name, []) if node.op_type == "Cast"]
        cast_types = {helper.get_attribute_value(a) for node in casts for a in node.attribute if a.name == "to"}
        for to in cast_types:
            total += n * helper.tensor_dtype_to_np_dtype(to).itemsize
        if len(casts) < len(readers.get(name, [])) or not casts:
            total += n * np.dtype(dtype).itemsize
    return int(total)


def _past_key(session):
    """The graph's declaration of past_key_values.0.key: a session's NodeArg, or a StagedSession's ValueInfoProto;
    None for a graph without a KV cache input."""
    return next((i for i in session.get_inputs() if i.name == kv_names(0)[0]), None)


def _kv_dtype(session) -> type:
    """The KV cache's numpy type, as the graph declares past_key_values.0.key: a session's NodeArg gives
    "tensor(float16)", a StagedSession's ValueInfoProto an onnx element type."""
    from onnx import TensorProto

    i = _past_key(session)
    if i is None:
        return np.float32
    t = i.type if isinstance(i.type, str) else i.type.tensor_type.elem_type
    return np.float16 if t in ("tensor(float16)", TensorProto.FLOAT16) else np.float32


def _kv_append(session) -> bool:
    """Whether the graph takes its cache position-major and returns only the new positions (the wasm graph since
    session 23, onnx_export.attention_append): past_key_values.0.key's second axis is the past's length."""
    i = _past_key(session)
    if i is None:
        return False
    dims = i.shape if hasattr(i, "shape") else [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
    return len(dims) == 4 and dims[1] == "past_seq"


def top_k_sorted(logits: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """numpy twin of runtime.generate.top_candidates (same order, ties broken by the lower id)."""
    k = min(k, logits.size)
    part = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    kth = logits[part].min()
    part = np.flatnonzero(logits >= kth)                     # every tie of the k-th value, so ties order by id
    order = part[np.lexsort((part, -logits[part]))][:k]
    return order.tolist(), logits[order].astype(np.float64).tolist()
