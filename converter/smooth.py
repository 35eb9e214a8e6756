"""Activation smoothing (SmoothQuant-style) for the int8 and 4-bit group schemes: move each input channel's range
from the activations into the weights before quantizing, by per-channel scales that cancel exactly in float.

Why. The int8 scheme quantizes every activation row to 8 bits at run time (one scale per token, the int8 graph's
DynamicQuantizeMatMul). SmolLM2's activations have a few channels hundreds of times larger than the rest (the
down_proj input reaches 2,374 in layer 28 where most channels are below 10), so one token's step is set by those
channels and the others keep a handful of levels. Measured on SmolLM2 (`converter eval --tasks kl`, 10 texts):
the per-row int8 weights alone, run with float activations, cost KL 0.0046; the int8 bundle costs 0.049, so nine
tenths of it is the activations. Dividing channel j of an activation by s_j and multiplying column j of the
weight that reads it by s_j leaves the product unchanged and flattens the activation row (README "Quality").
For the 4-bit group schemes the same scales work on the weights' side: columns that meet large activations are
scaled up before rounding, so their rounding error, which those activations multiply, shrinks relative to the
weight (AWQ's observation): SmolLM2 int4-g32 KL 0.353 -> 0.162 on model.onnx (float compute), 0.358 -> 0.162 on
the wasm graph, with one alpha. For those schemes the default is a search (alpha=None, `--smooth auto`): each layer
group takes the best of SEARCH_CANDIDATES by its quantized output error (_search), 0.353 -> 0.147.

Where the scales go (each folds into the float tensor that makes the activation, so the graph is unchanged):

    input_layernorm.weight / s1  ->  q/k/v_proj columns * s1
    v_proj rows / s4            ->  o_proj columns * s4 (one scale per value channel, shared by the heads of a group)
    post_attention_layernorm / s2 -> gate/up_proj columns * s2
    up_proj rows / s3           ->  down_proj columns * s3   (the down input is silu(gate) * up)

s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), from a float pass over calibration text (the end of
pydoc_data.topics, as converter.calibrate uses), clipped to [1e-2, 1e2]. The pass keeps one layer's activations
at a time; the scales are applied as each weight is loaded (SmoothedCheckpoint), so memory stays bounded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import LlamaConfig

SCALE_RANGE = (1e-2, 1e2)
# alpha=None in smoothing_scales: each layer group takes the best of these (candidate_scales). Measured on SmolLM2
# int4-g32 (README "Quality"): off and the max form alone KL 0.153, perplexity 15.81; with the mean form 0.147, 15.69
SEARCH_CANDIDATES = (None, ("max", 0.25), ("max", 0.5), ("max", 0.75), ("mean", 0.25), ("mean", 0.5), ("mean", 0.75))
SEARCH_ROWS = 512                          # activation rows the search measures each candidate's output error on
SEARCH_OUT_ROWS = 1024                     # and at most about this many output rows of each weight


@dataclass
class Smoothing:
    """The scales of every decoder layer: name -> (column scale or None, row divisor or None) per weight."""
    alpha: float
    tokens: int
    text: dict
    scales: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = field(default_factory=dict)
    chosen: dict[str, int] = field(default_factory=dict)   # searched: how many layer groups took each candidate

    def record(self) -> dict:
        if self.alpha is not None:
            return {"alpha": self.alpha, "tokens": self.tokens, "text": self.text}
        return {"alpha": "auto", "tokens": self.tokens, "text": self.text, "chosen": dict(sorted(self.chosen.items()))}


def channel_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), clipped to SCALE_RANGE."""
    s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1.0 - alpha)
    return np.clip(s, *SCALE_RANGE).astype(np.float32)


def candidate_scales(cand, x_max: np.ndarray, x_mean: np.ndarray, w_max: np.ndarray) -> np.ndarray:
    """The scales of one search candidate: None (ones: no smoothing), ("max", alpha) (channel_scales, SmoothQuant's
    form) or ("mean", alpha): mean|x_j|^alpha normalised by the geometric mean of its extremes (AWQ's form)."""
    if cand is None:
        return np.ones_like(x_max, dtype=np.float32)
    stat, a = cand
    if stat == "max":
        return channel_scales(x_max, w_max, a)
    s = np.power(np.maximum(x_mean, 1e-5), a)
    return np.clip(s / np.sqrt(s.max() * s.min()), *SCALE_RANGE).astype(np.float32)


def candidate_name(cand) -> str:
    return "off" if cand is None else f"{cand[0]}{cand[1]}"


def _search(x: np.ndarray, ws: list[np.ndarray], x_max: np.ndarray, x_mean: np.ndarray, w_max: np.ndarray,
            candidates, qdq, expand=None):
    """(scales, candidate) of the candidate whose quantized weights best reproduce these layers' outputs on the
    activation rows `x`: argmin sum_w |x w^T - (x / s) qdq(w * s)^T|^2, as AWQ chooses its scales. `expand` maps
    the scales to the weights' columns (o_proj: one scale per value channel)."""
    # output rows are independent under every group scheme (groups run along the input), so an even subset of
    # each weight's rows measures the same error at a fraction of the cost
    ws = [w[::-(-w.shape[0] // SEARCH_OUT_ROWS)] for w in ws]
    refs = [x @ w.T for w in ws]
    best = None
    for cand in candidates:
        s = candidate_scales(cand, x_max, x_mean, w_max)
        cols = s if expand is None else expand(s)
        xs = x / cols
        err = 0.0
        for w, r in zip(ws, refs):
            d = xs @ qdq(w * cols[None, :]).T - r
            err += float(np.einsum("ij,ij->", d, d))
        if best is None or err < best[0]:
            best = (err, s, cand)
    return best[1], best[2]


def smoothing_scales(checkpoint, cfg: LlamaConfig, ids: np.ndarray, alpha: float | None, text: dict,
                     progress=None, qdq=None) -> Smoothing:
    """A float pass over `ids` (sequences, seq_len), one layer at a time, measuring each linear input's per-channel
    maximum; returns the scales (module docstring). The smoothed model computes the same activations up to the
    scaled channels, so the unsmoothed pass measures what every layer sees."""
    from .calibrate import _attention, _rms_norm

    n, s = ids.shape
    hd, nh, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    rep = nh // kvh
    emb = checkpoint.load("model.embed_tokens.weight")
    x = emb[ids.reshape(-1)].astype(np.float32)                                 # (n·s, H)
    del emb
    out = Smoothing(alpha, int(ids.size), text)
    rows = np.unique(np.linspace(0, ids.size - 1, min(SEARCH_ROWS, ids.size)).astype(np.int64))

    def pick(x, ws, x_max, w_max, expand=None, x_mean=None):
        if alpha is not None:
            return channel_scales(x_max, w_max, alpha)
        x_mean = np.abs(x).mean(0) if x_mean is None else x_mean
        sc, cand = _search(x[rows], ws, x_max, x_mean, w_max, SEARCH_CANDIDATES, qdq, expand)
        key = candidate_name(cand)
        out.chosen[key] = out.chosen.get(key, 0) + 1
        return sc

    col_max = lambda ws: np.max([np.abs(w).max(0) for w in ws], axis=0)  # noqa: E731
    L = cfg.num_hidden_layers
    for i in range(L):
        if progress:
            progress(f"smoothing: layer {i}", i, L)
        p = f"model.layers.{i}."
        load = lambda name: checkpoint.load(p + name + ".weight").astype(np.float32)  # noqa: E731
        wq, wk, wv, wo = (load("self_attn." + t) for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
        h = _rms_norm(x, load("input_layernorm"), cfg.rms_norm_eps)
        s1 = pick(h, [wq, wk, wv], np.abs(h).max(0), col_max([wq, wk, wv]))
        ctx = _attention(cfg, h @ wq.T, h @ wk.T, h @ wv.T, n, s)                  # (n·s, nh·hd)
        # o_proj's input channel (head, d) is value channel (head // rep, d): one scale per value channel
        c_max = np.abs(ctx).max(0).reshape(kvh, rep, hd).max(1).reshape(-1)
        o_max = np.abs(wo).max(0).reshape(kvh, rep, hd).max(1).reshape(-1)
        expand = lambda sv: np.repeat(sv.reshape(kvh, 1, hd), rep, axis=1).reshape(-1)  # noqa: E731
        c_mean = np.abs(ctx).mean(0).reshape(kvh, rep, hd).max(1).reshape(-1)
        s4 = pick(ctx, [wo], c_max, o_max, expand, c_mean)
        x = x + ctx @ wo.T
        del h, ctx
        wg, wu, wd = (load("mlp." + t) for t in ("gate_proj", "up_proj", "down_proj"))
        h2 = _rms_norm(x, load("post_attention_layernorm"), cfg.rms_norm_eps)
        s2 = pick(h2, [wg, wu], np.abs(h2).max(0), col_max([wg, wu]))
        gate, up = h2 @ wg.T, h2 @ wu.T
        a = (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)
        s3 = pick(a, [wd], np.abs(a).max(0), np.abs(wd).max(0))
        x = (x + a @ wd.T).astype(np.float32)
        del h2, gate, up, a
        s4_o = expand(s4)
        out.scales.update({
            p + "input_layernorm.weight": (None, s1),
            p + "self_attn.q_proj.weight": (s1, None),
            p + "self_attn.k_proj.weight": (s1, None),
            p + "self_attn.v_proj.weight": (s1, s4),
            p + "self_attn.o_proj.weight": (s4_o, None),
            p + "post_attention_layernorm.weight": (None, s2),
            p + "mlp.gate_proj.weight": (s2, None),
            p + "mlp.up_proj.weight": (s2, s3),
            p + "mlp.down_proj.weight": (s3, None),
        })
    if progress:
        progress("smoothing", L, L)
    return out


def apply(name: str, w: np.ndarray, smoothing: Smoothing) -> np.ndarray:
    """The smoothed tensor: a weight (out, in) times its column scales and divided by its row divisors; a norm
    weight (1-D) divided by its scales."""
    if name not in smoothing.scales:
        return w
    cols, rows = smoothing.scales[name]
    w = w.astype(np.float32)
    if w.ndim == 1:
        return (w / rows).astype(np.float32)
    if cols is not None:
        w = w * cols[None, :]
    if rows is not None:
        w = w / rows[:, None]
    return w.astype(np.float32)


def row_relative(checkpoint, name: str) -> np.ndarray | None:
    """Relative row steps for an int8-eB weight whose rows smoothing divided (v_proj by the o_proj scales, up_proj
    by the down_proj scales): 1 / divisor, so the smoothed row keeps its precision relative to its weights. int8-eB
    has one step per matrix, not per group, and without this the rows feeding the largest activations would be
    rounded the coarsest, undoing what the scales buy the next layer (SmolLM2 int8-e3.2: KL 0.67 unsmoothed,
    1.01 smoothed with one step per matrix, docs/quality.md)."""
    smoothing = getattr(checkpoint, "smoothing", None)
    rows = smoothing.scales.get(name, (None, None))[1] if smoothing is not None else None
    return None if rows is None else 1.0 / rows.astype(np.float64)


class SmoothedCheckpoint:
    """A loaders checkpoint whose load() returns smoothed tensors; everything else is the wrapped checkpoint's."""

    def __init__(self, checkpoint, smoothing: Smoothing):
        self._checkpoint = checkpoint
        self.smoothing = smoothing

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)

    def load(self, name: str) -> np.ndarray:
        return apply(name, self._checkpoint.load(name), self.smoothing)
