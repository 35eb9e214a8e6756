"""Low-memory mode: the bundle's graph run as a chain of onnxruntime sessions, one per stage of decoder layers,
created one after another so that the model never exists twice.

Why. onnxruntime CPU prepacks every constant GEMM weight into its own layout while a session is created, which is
what makes decode fast (SmolLM2's lm_head: 2-3 ms per token prepacked, 12-13 ms unpacked). One session over the
whole graph therefore holds, at its peak, our decoded weights (which it borrows, see ort_session.py) next to its
packed copy of all of them: SmolLM2 int8 peaks 338 MiB above the interpreter for 133 MiB of weights + KV. Here each
stage is given a copy of only its own weights, packs it and frees the copy, and ours are dropped as soon as the
stage exists: 247 MiB, at ~5-12% more time per token (a session.run per stage). The tied embedding stays twice (raw
for the Gather, packed for the lm_head); the stages that read it borrow our array, which they keep.

Stages: stage 0 is everything before layer 0 (embedding, rotary tables, attention mask), then one stage per
`layers_per_stage` layers (nodes named /model/layers.i/ or /quantize/layers.i/), then the final norm and the lm_head;
a node never runs before a stage that produces one of its inputs. Nodes computed from initializers alone (scale
casts and the like) are copied into every stage that reads them, so that each session folds its own. The tensors
passed between stages (hidden states, rotary tables, the mask, each layer's present K/V) stay numpy arrays here.

The kernels are those of the single session, so the logits are too, bit for bit (tests/test_ort_stages.py).
"""
from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field

import numpy as np

from .layouts import (KN_SUFFIX, PIECES_SUFFIX, block_scale_parts, block_scales, column_pieces, kn_initializer,
                      kn_tables, multiplied_codes, multiplied_parts)
from .ort_session import BORROW_BUFFERS, HALVES, eight_bit_half, graph_model

LAYER = re.compile(r"^/(?:model|quantize)/layers\.(\d+)/")
HEAD = re.compile(r"^/(?:lm_head|quantize/lm_head|model/norm)(?:/|$)")


@dataclass
class Stage:
    nodes: list[int]                                     # indices into graph.node, in graph order
    inputs: list[str]                                    # graph inputs first, then tensors of earlier stages
    outputs: list[str]                                   # graph outputs, then tensors later stages read
    initializers: list[str] = field(default_factory=list)


def plan_stages(graph, layers_per_stage: int = 1) -> list[Stage]:
    """Split a decoder graph (onnx GraphProto, nodes in topological order as ONNX requires) into stages."""
    const = {t.name for t in graph.initializer} | {""}
    const_nodes: set[int] = set()
    for i, n in enumerate(graph.node):
        if all(x in const for x in n.input):              # computed from initializers alone (or a Constant)
            const_nodes.add(i)
            const.update(n.output)
    layers = [int(m.group(1)) for n in graph.node if (m := LAYER.match(n.name))]
    head = 1 + (max(layers, default=-1) // layers_per_stage) + 1
    stage_of: dict[int, int] = {}
    producer: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        if i in const_nodes:
            continue
        if m := LAYER.match(n.name):
            s = 1 + int(m.group(1)) // layers_per_stage
        else:
            s = head if HEAD.match(n.name) else 0
        stage_of[i] = max([s] + [stage_of[producer[x]] for x in n.input if x in producer])
        for o in n.output:
            producer[o] = i
    read_by: dict[str, set[int]] = {}
    for i, s in stage_of.items():
        for x in graph.node[i].input:
            read_by.setdefault(x, set()).add(s)
    const_producer = {o: i for i in const_nodes for o in graph.node[i].output}
    graph_inputs = [x.name for x in graph.input]
    graph_outputs = [x.name for x in graph.output]
    initializers = {t.name for t in graph.initializer}
    stages = []
    for s in sorted(set(stage_of.values())):
        own = [i for i, t in stage_of.items() if t == s]
        needed: set[int] = set()
        todo = [x for i in own for x in graph.node[i].input if x in const_producer]
        while todo:
            j = const_producer[todo.pop()]
            if j not in needed:
                needed.add(j)
                todo += [x for x in graph.node[j].input if x in const_producer]
        nodes = sorted(own + list(needed))
        read = {x for i in nodes for x in graph.node[i].input}
        made = {o for i in own for o in graph.node[i].output}
        passed = [x for x in dict.fromkeys(x for i in own for x in graph.node[i].input) if x in producer and x not in made]
        outputs = [o for o in graph_outputs if o in made]
        outputs += sorted(o for o in made if o not in graph_outputs and any(t > s for t in read_by.get(o, ())))
        stages.append(Stage(nodes, [x for x in graph_inputs if x in read] + passed, outputs,
                            sorted(initializers & read)))
    return stages


def stage_model(model, stage: Stage, types: dict[str, str]) -> bytes:
    """The serialized ModelProto of one stage; types: onnxruntime type strings of the tensors earlier stages make."""
    import onnx
    from onnx import helper

    g = model.graph
    by_input = {x.name: x for x in g.input}
    T = onnx.TensorProto
    elem = {"tensor(float)": T.FLOAT, "tensor(float16)": T.FLOAT16, "tensor(int64)": T.INT64, "tensor(int32)": T.INT32,
            "tensor(bool)": T.BOOL, "tensor(uint8)": T.UINT8, "tensor(int8)": T.INT8}
    inputs = [by_input[x] if x in by_input else helper.make_tensor_value_info(x, elem[types[x]], None)
              for x in stage.inputs]
    outputs = [onnx.ValueInfoProto(name=o) for o in stage.outputs]       # onnxruntime infers their types
    init = {t.name: t for t in g.initializer}
    sg = helper.make_graph([g.node[i] for i in stage.nodes], g.name, inputs, outputs,
                           [init[t] for t in stage.initializers])
    return helper.make_model(sg, opset_imports=model.opset_import, ir_version=model.ir_version).SerializeToString()


class _Output:
    def __init__(self, name: str):
        self.name = name


class StagedSession:
    """The part of onnxruntime.InferenceSession that OrtDecoder uses (run, get_inputs, get_outputs), over stages."""

    def __init__(self, sessions: list, inputs: list, outputs: list[str]):
        self.sessions = sessions
        self.borrowed: dict[str, np.ndarray] = {}
        self._inputs = inputs
        self._outputs = outputs
        self._stage_io = [([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]) for s in sessions]

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return [_Output(n) for n in self._outputs]

    def run(self, output_names, feeds: dict):
        values = dict(feeds)
        for sess, (ins, outs) in zip(self.sessions, self._stage_io):
            values.update(zip(outs, sess.run(outs, {k: values[k] for k in ins})))
        return [values[n] for n in (output_names or self._outputs)]

    def run_bound(self, feeds: dict, buffers: dict) -> dict:
        """Every stage through IOBinding, the tensors named in `buffers` read and written in place
        (kv_inplace.run_bound_session); returns every other tensor the stages made, the logits among them."""
        from .kv_inplace import run_bound_session

        values = dict(feeds)
        for sess in self.sessions:
            values.update(run_bound_session(sess, values, buffers))
        return values


def layers_per_stage(bundle, half: bool = False) -> int:
    """As many layers per stage as fit in STAGE_BYTES of weights (at least one), or in half that: each session.run
    costs ~0.1-0.3 ms, and while a stage is created its weights exist about three times (ours, onnxruntime's copy,
    the packed one). With --strict-memory and the in-place KV cache (create_staged_session) that creation is the
    peak of a short run, so its stages are half as large. Session 16, SmolLM2, 64 steps after a 41-token prompt,
    session's share at its peak: int4-g32 128.9 -> 120.8 MiB with half-size stages (6 -> 10 sessions), int8
    166.3 -> 163.8; decode, both in one process, steps alternating: int4-g32 12.91 -> 13.25 ms a step, int8 13.49 ->
    13.52. With the Concat cache the decode steps are the peak, and half-size stages did not lower it (int8 169.3 ->
    171.3, int4-g32 127.3 -> 128.6)."""
    layer0 = sum(e["nbytes"] for e in bundle.initializers if e["name"].startswith("model.layers.0."))
    return max(1, (STAGE_BYTES // 2 if half else STAGE_BYTES) // max(1, layer0))


STAGE_BYTES = 16 << 20   # SmolLM2 int8: 4 layers (3.6 MB each); Llama-3.2-1B int8 (~61 MB a layer): 1
NO_PREPACKING = "session.disable_prepacking"      # onnxruntime session config key

# STRICT. With `strict`, the lm_head of a tied model multiplies by the same int8 (or float) buffer that the
# embedding's Gather reads, unpacked: onnxruntime's GEMM then packs the weight on the fly at every run (SmolLM2 int8:
# the lm_head takes ~12 ms per token instead of 2-3, decode ~1.3x slower) and the 27 MiB packed copy is never made.
# An untied model has no shared weight, so strict changes nothing there.


def create_staged_session(bundle, threads: int = 1, verify: bool = True, variant: str = "graph",
                          layers: int | None = None, strict: bool = False, int8_compute: bool = False,
                          kv_inplace: bool = False) -> StagedSession:
    """layers: per stage (default layers_per_stage, half-size stages for strict with kv_inplace). strict: the
    stages that share a weight (a tied embedding: the Gather of stage 0 and the lm_head) read it unpacked, so it
    exists once (STRICT below).
    int8_compute: ort_session.set_int8_compute. kv_inplace: the graph rewritten for a KV cache written in place
    (kv_inplace.py; run it with StagedSession.run_bound)."""
    import onnx
    import onnxruntime as ort

    _shared_arena(ort)
    model = graph_model(bundle, variant == "graph_fp16", variant, int8_compute, kv_inplace)
    stages = plan_stages(model.graph, layers or layers_per_stage(bundle, half=strict and kv_inplace))
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    dims = {t.name: list(t.dims) for t in model.graph.initializer if t.name[-4:] in HALVES}
    seen: set[str] = set()
    shared: set[str] = set()
    for st in stages:
        shared.update(seen & set(st.initializers))
        seen.update(st.initializers)
    kn = kn_tables(bundle.manifest.get(variant, {}))   # wasm graph: NAME.kn from NAME's codes, scales, zero points
    multiplied = bundle.manifest.get(variant, {}).get("multiplied", {})   # and from int4-mG's codes, zeros, mults
    pieces = bundle.manifest.get(variant, {}).get("pieces", {})   # int8 (K, N) tables in pieces (NAME.pieces)
    scaled = set(bundle.manifest.get(variant, {}).get("block_scales", []))   # int4-mG's block scales (model.onnx)
    entries = {e["name"]: e for e in bundle.initializers}
    in_memory = hasattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory")   # onnxruntime >= 1.29
    kept: dict[str, np.ndarray] = {}    # shared initializers, borrowed by every stage that reads them
    sessions, types = [], {}
    with bundle.open_initializers(verify) as read:
        def array(name: str) -> np.ndarray:
            if name in kept:
                return kept[name]
            if name[-4:] in HALVES and name in dims:                  # 8-bit group codes' packed halves
                return eight_bit_half(read(name[:-4]), name, dims[name])
            whole = name[:-len(PIECES_SUFFIX)]
            if name.endswith(PIECES_SUFFIX) and whole in pieces:       # the wasm graph's tables in pieces
                return column_pieces(array(whole), pieces[whole])
            base = name[:-len(KN_SUFFIX)]
            if name.endswith(KN_SUFFIX) and base in kn:
                return kn_initializer(base, read(base), entries)
            if name.endswith(KN_SUFFIX) and base in multiplied:       # int4-mG: int8 (q - z)·m
                return multiplied_codes(read(base), *(read(p) for p in multiplied_parts(base)),
                                        entries[base]["layout"])
            weight = name[:-len(".scales")]
            if name.endswith(".scales") and weight in scaled:         # int4-mG: row scales × multipliers
                codes = entries[weight + ".q"]
                return block_scales(*(read(p) for p in block_scale_parts(weight)[1:]), codes["shape"],
                                    codes["layout"])
            return np.ascontiguousarray(read(name))

        for s, st in enumerate(stages):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            so.add_session_config_entry("session.use_env_allocators", "1")   # the shared arena (_shared_arena)
            if threads > 1:                     # 30-odd thread pools must not spin while the others run
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            names = [t for t in st.initializers if t in external]
            if in_memory and any(t in shared for t in names):
                # a stage reading an initializer that another stage reads too (the tied embedding) borrows its
                # weights in place (the config entry is per session); they live as long as the sessions
                so.add_session_config_entry(BORROW_BUFFERS, "1")
                if strict:
                    so.add_session_config_entry(NO_PREPACKING, "1")
                for t in names:
                    kept.setdefault(t, array(t))
                arrays = [kept[t] for t in names]
                files = [a.reshape(-1).view(np.uint8) for a in arrays]
                so.add_external_initializers_from_files_in_memory(names, files, [f.nbytes for f in files])
            else:
                # onnxruntime copies OrtValues given to add_external_initializers (tests/test_ort_stages.py scribbles
                # over ours after creation), packs its copy of each weight and frees the copy. The session options
                # do not keep the OrtValues alive, so ours are held here until the session exists, and not longer.
                arrays = [array(t) for t in names]
                so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
            sess = ort.InferenceSession(stage_model(model, st, types), so, providers=["CPUExecutionProvider"])
            for o in sess.get_outputs():
                types[o.name] = o.type
            sessions.append(sess)
            del so, arrays
            _trim_heap()
    staged = StagedSession(sessions, [i for i in model.graph.input], [o.name for o in model.graph.output])
    staged.borrowed = kept              # name -> array, read in place by the stages that share them
    return staged


def _shared_arena(ort) -> None:
    """Register one CPU arena for every staged session of this process (once). With an arena per session each kept
    ~2 MiB after a prefill (+64 MiB for SmolLM2); with no arena, the KV tensors, one position longer at every step,
    fragmented the heap (SmolLM2 int8, 512 decode steps: +281 MiB). The arena grows by doubling: grown by exactly
    each failing request instead, its regions, never freed, piled up quadratically with the KV length (+3.1 GiB
    over 512 steps; doubling: +83 MiB, one session's own arena: +64 MiB; tests/test_ort_stages.py)."""
    global _ARENA_REGISTERED
    if _ARENA_REGISTERED:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 0,     # kNextPowerOfTwo
                                                             "initial_chunk_size_bytes": 1 << 20}))
    _ARENA_REGISTERED = True


_ARENA_REGISTERED = False


def _trim_heap() -> None:
    """Give the heap pages that onnxruntime freed after packing back to the system (glibc; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
