"""Generation with the KV cache written in place: model.onnx rewritten around com.microsoft.GroupQueryAttention.

Why. The bundle's graph appends each step's keys and values with a Concat: every decode step reads the whole past
cache and writes a one-position-longer copy of it (present), so a step holds two copies of the cache and moves all
of it. onnxruntime's GroupQueryAttention instead takes a past buffer of fixed capacity [B, kv, C, hd] and, when the
present output is bound to the same memory (IOBinding), writes only the new positions into it. One copy, nothing
moved; the capacity grows by doubling when a prompt would pass it.

What changes in the graph (per layer, nodes found by their deterministic names, see onnx_export.attention):

    q_proj ─► RotaryEmbedding (3-D, num_heads) ─┐
    k_proj ─► RotaryEmbedding (3-D, num_heads) ─┤
    v_proj ─────────────────────────────────────┼─► GroupQueryAttention ─► o_proj
    past_key_values.i.key / .value [B,kv,C,hd] ─┘        └─► present.i.key / .value (the same buffers)
    seqlens_k [B] int32 = cached + S - 1,  total_sequence_length [] int32 = cached + S

Everything else (the linears of every scheme, the norms, the MLP, the lm_head) is the bundle's graph itself. The
attention mask input goes: GroupQueryAttention masks causally from the sequence lengths, so this graph serves batch 1
(generation), never left-padded batches; evaluation keeps model.onnx. Float32 graphs only (model.onnx; the wasm and
float16 graphs keep their caches in float16).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import TinyQMoEError
from .onnx_export import MS_DOMAIN, kv_names

SEQLENS = "seqlens_k"                       # int32 [B]: positions held after this run, minus one
TOTAL = "total_sequence_length"             # int32 scalar: positions held after this run
CAPACITY = "kv_capacity"                    # the dim_param of the cache's sequence axis
REFUSAL = "in-place KV cache"               # how the rewrite's errors start (cli falls back to the Concat graph)


def inplace_kv_graph(model, cfg):
    """Rewrite an onnx ModelProto of the bundle's float32 graph (model.onnx) into the in-place generation graph.
    Raises TinyQMoEError when the graph is not one this exporter wrote (a node it expects is missing)."""
    from onnx import TensorProto, helper

    g = model.graph
    by_name = {n.name: n for n in g.node}
    nh, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    new_nodes, rename, drop = [], {}, set()
    for i in range(cfg.num_hidden_layers):
        p = f"/model/layers.{i}/attn"
        try:
            q_lin = by_name[f"{p}/q/Reshape"].input[0]
            k_lin = by_name[f"{p}/k/Reshape"].input[0]
            v_lin = by_name[f"{p}/v/Reshape"].input[0]
            q_rope = by_name[f"{p}/q_rotary/RotaryEmbedding"]
            merge = by_name[f"{p}/ctx/Merge"].output[0]
            concat_k, concat_v = by_name[f"{p}/k_cache/Concat"], by_name[f"{p}/v_cache/Concat"]
        except KeyError as e:
            raise TinyQMoEError(f"{REFUSAL}: the graph has no node {e.args[0]} (not a float32 model.onnx "
                                "of this exporter)") from None
        _, pos, cos, sin = q_rope.input
        past_k, past_v, present_k, present_v = kv_names(i)
        q = f"{p}/q_rotary/RotaryEmbedding3D/output_0"
        k = f"{p}/k_rotary/RotaryEmbedding3D/output_0"
        ctx = f"{p}/GroupQueryAttention/output_0"
        new_nodes += [
            helper.make_node("RotaryEmbedding", [q_lin, pos, cos, sin], [q], name=f"{p}/q_rotary/RotaryEmbedding3D",
                             domain=MS_DOMAIN, interleaved=0, num_heads=nh),
            helper.make_node("RotaryEmbedding", [k_lin, pos, cos, sin], [k], name=f"{p}/k_rotary/RotaryEmbedding3D",
                             domain=MS_DOMAIN, interleaved=0, num_heads=kv),
            helper.make_node("GroupQueryAttention", [q, k, v_lin, past_k, past_v, SEQLENS, TOTAL],
                             [ctx, present_k, present_v], name=f"{p}/GroupQueryAttention", domain=MS_DOMAIN,
                             num_heads=nh, kv_num_heads=kv, scale=1.0 / math.sqrt(hd), do_rotary=0)]
        rename[merge] = ctx
        drop.update((concat_k.name, concat_v.name))
    kept = []
    for n in g.node:
        if n.name in drop:
            continue
        for j, x in enumerate(n.input):
            if x in rename:
                n.input[j] = rename[x]
        kept.append(n)
    # the new nodes go right after their last input's producer would be simplest; appending them and sorting is
    # simpler still: ONNX wants topological order
    nodes = _topological(kept + new_nodes, {x.name for x in g.input} | {t.name for t in g.initializer}
                         | {SEQLENS, TOTAL})
    nodes = _live(nodes, [o.name for o in g.output])
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in nodes for x in n.input}
    inputs = [x for x in g.input if x.name in used]
    inputs += [helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]),
               helper.make_tensor_value_info(TOTAL, TensorProto.INT32, [])]
    del g.input[:]
    g.input.extend(inputs)
    for v in list(g.input) + list(g.output):
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.shape.dim[2].dim_param = CAPACITY
    del g.value_info[:]
    return model


def _topological(nodes, available: set[str]) -> list:
    """Nodes in an order where every input is produced first (stable: the given order wherever it already is)."""
    available = set(available) | {""}
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(x in available for x in n.input):
                out.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise TinyQMoEError(f"{REFUSAL}: node {rest[0].name} reads a tensor nothing produces")
        pending = rest
    return out


def _live(nodes, outputs: list[str]) -> list:
    """Drop the nodes nothing needed reads (the old attention, the mask, the Concat caches)."""
    need = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(n.input)
    return keep[::-1]


class InplaceCache:
    """The per-layer K/V buffers [1, kv, C, hd] float32 that the session reads and writes in place, and the
    IOBinding that ties each present output to its past input."""

    FIRST = 256                              # initial capacity (positions); doubles as needed

    def __init__(self, session, cfg):
        self.session, self.cfg = session, cfg
        self.length = 0
        self.capacity = 0
        self.bufs: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        self.length = 0

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {n}")
        self.length = n                      # positions past n are overwritten by the next run

    def _ensure(self, need: int) -> None:
        if need <= self.capacity:
            return
        cap = max(self.FIRST, self.capacity)
        while cap < need:
            cap *= 2
        c = self.cfg
        for i in range(c.num_hidden_layers):
            for name in kv_names(i)[:2]:
                new = _zeros_mapped((1, c.num_key_value_heads, cap, c.head_dim))
                if self.length:
                    new[:, :, :self.length] = self.bufs[name][:, :, :self.length]
                self.bufs[name] = new
        self.capacity = cap

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """feeds: input_ids [1,S], position_ids, num_logits_to_keep; returns the logits and advances the cache."""
        S = feeds["input_ids"].shape[1]
        total = self.length + S
        self._ensure(total)
        feeds = dict(feeds)
        feeds[SEQLENS] = np.array([total - 1], np.int32)
        feeds[TOTAL] = np.array(total, np.int32)
        buffers = {}
        for i in range(self.cfg.num_hidden_layers):
            pk, pv, ck, cv = kv_names(i)
            buffers[pk] = buffers[ck] = self.bufs[pk]
            buffers[pv] = buffers[cv] = self.bufs[pv]
        run_bound = getattr(self.session, "run_bound", None)     # a StagedSession (ort_stages.py) binds per stage
        out = run_bound(feeds, buffers) if run_bound else run_bound_session(self.session, feeds, buffers)
        self.length = total
        return out["logits"]


def _zeros_mapped(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of zeros in its own anonymous mapping: the kernel hands out zeroed pages on first touch, so
    the capacity not yet written costs no memory. (np.zeros would take these ~0.2-2 MB from the heap once onnxruntime
    has freed large blocks — glibc then raises its mmap threshold — and calloc would write every byte.)"""
    import mmap

    n = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.float32, count=n // 4).reshape(shape)


def run_bound_session(sess, feeds: dict[str, np.ndarray], buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One onnxruntime session run through IOBinding: inputs and outputs named in `buffers` read and write those
    numpy arrays in place (a past and its present given the same array: GroupQueryAttention then appends in place);
    the other inputs come from feeds; returns the other outputs as numpy arrays."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for x in sess.get_inputs():
        if x.name in buffers:
            buf = buffers[x.name]
            binding.bind_input(x.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        else:
            binding.bind_cpu_input(x.name, np.ascontiguousarray(feeds[x.name]))
    outs = [o.name for o in sess.get_outputs()]
    other = [o for o in outs if o not in buffers]
    for o in other:                                  # first: get_outputs() lists the outputs in binding order
        binding.bind_output(o, "cpu")
    for o in outs:
        if o in buffers:
            buf = buffers[o]
            binding.bind_output(o, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
    sess.run_with_iobinding(binding, ort.RunOptions())
    values = binding.get_outputs()
    return {o: values[j].numpy() for j, o in enumerate(other)}
