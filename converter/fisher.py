"""Per-row Fisher information of the linear layers (`--fisher-rows`): which output rows of a matrix matter.

int8-eB gives every row of a matrix the same step, the best choice when every row matters equally. They do not:
KL(float ‖ quantized) per token is, to second order, ½ Σ_r F_r · E[(ΔW_r x)²], where F_r = E[(∂ log p(y) / ∂ out_r)²]
is the Fisher information of output r of that matrix, y a token sampled from the model. A row that moves the
prediction more deserves a finer step, and rate-distortion theory puts the optimum at step_r ∝ F_r^(−1/2).

Measured on SmolLM2 (docs/quality.md, session 27), the full exponent over-allocates (KL 0.30 → 0.35 at the same
entropy), half of it helps, and only where the rows differ in kind: the rows of q_proj and k_proj (RoPE's
frequency pairs, some of which carry most of the attention), v_proj and up_proj. o_proj's and down_proj's rows are
residual-stream channels and gate_proj's feed SiLU; weighting theirs made the KL no better or worse. So rows of
FISHER_KINDS get

    relative step_r = (F_r / geometric mean of F)^(−BETA / 2),   rounded to LEVELS_PER_OCTAVE steps per octave,

(rounded so that the float16 step streams keep few distinct values and still cost almost nothing), and the
scheme's bisection then finds the matrix's step for the same order-0 entropy as before.

F is measured on the float model (numpy, float32) over the calibration windows, with one token sampled from the
model's own distribution at every position (seeded), and a hand-written backward pass (RMSNorm, rotate-half
RoPE, causal grouped-query attention, SwiGLU, the tied or untied lm_head) that tests/test_fisher.py checks against
finite differences. The whole float model is in memory for it (SmolLM2: ~2 GB at the peak with 4 × 256-token
batches).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .config import LlamaConfig, rope_inv_freq

F = np.float32
EMBED, HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
FISHER_KINDS = ("q_proj", "k_proj", "v_proj", "up_proj")
BETA = 0.5
LEVELS_PER_OCTAVE = 4
BATCH = 4                       # windows per forward/backward pass
SEED = 0                        # the sampled tokens' seed
Progress = Callable[[str, int, int], None]


def weighted(name: str) -> bool:
    """True for the matrices whose rows get Fisher-weighted steps."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in FISHER_KINDS and parts[-1] == "weight"


class Decoder:
    """The decoder over whole windows in numpy: forward keeping what backward needs, and a backward pass that hands
    the gradient of the loss with respect to each linear layer's output to `on_output_grad(name, dy)`."""

    def __init__(self, cfg: LlamaConfig, weights: dict[str, np.ndarray]):
        self.cfg = cfg
        self.W = {n: np.ascontiguousarray(w, F) for n, w in weights.items()}
        self.head = HEAD if HEAD in self.W else EMBED
        self.hd = cfg.head_dim
        self.inv = np.asarray(rope_inv_freq(cfg), np.float64)
        self.cache = None
        self.keep_inputs = False             # forward records each linear layer's input in self.inputs (tests)
        self.inputs: dict[str, np.ndarray] = {}

    def _lin(self, x, name):
        if self.keep_inputs:
            self.inputs[name] = x
        return x @ self.W[name].T

    def _rope(self, s: int):
        e = np.outer(np.arange(s), self.inv)
        e = np.concatenate([e, e], -1)
        return np.cos(e).astype(F), np.sin(e).astype(F)

    @staticmethod
    def _half(x, sign):                      # rotate-half (sign −1) and its transpose (sign +1)
        h = x.shape[-1] // 2
        return np.concatenate([sign * x[..., h:], -sign * x[..., :h]], -1)

    def _norm(self, x, n):
        r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + F(self.cfg.rms_norm_eps))
        return x * r * self.W[n], r

    def _norm_back(self, dy, x, r, n):
        u = dy * self.W[n]
        return r * u - x * (r ** 3) * (u * x).mean(-1, keepdims=True)

    def forward(self, ids: np.ndarray, keep: bool = False) -> np.ndarray:
        """ids (B, S) -> logits (B·S, V)."""
        cfg, hd, W = self.cfg, self.hd, self.W
        b, s = ids.shape
        nkv = cfg.num_key_value_heads
        g = cfg.num_attention_heads // nkv
        cos, sin = self._rope(s)
        x = W[EMBED][ids].reshape(b * s, -1)
        mask = np.triu(np.full((s, s), -np.inf, F), 1)
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            c = {"x": x}
            h, c["r1"] = self._norm(x, p + "input_layernorm.weight")
            q = self._lin(h, p + "self_attn.q_proj.weight").reshape(b, s, nkv, g, hd).transpose(0, 2, 3, 1, 4)
            k = self._lin(h, p + "self_attn.k_proj.weight").reshape(b, s, nkv, 1, hd).transpose(0, 2, 3, 1, 4)
            v = self._lin(h, p + "self_attn.v_proj.weight").reshape(b, s, nkv, 1, hd).transpose(0, 2, 3, 1, 4)
            qr = q * cos + self._half(q, -1) * sin
            kr = k * cos + self._half(k, -1) * sin
            a = (qr @ kr.swapaxes(-1, -2)) * F(1 / math.sqrt(hd)) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = (a @ v).transpose(0, 3, 1, 2, 4).reshape(b * s, -1)
            c.update(qr=qr, kr=kr, v=v, P=a)
            x = x + self._lin(o, p + "self_attn.o_proj.weight")
            c["xm"] = x
            h2, c["r2"] = self._norm(x, p + "post_attention_layernorm.weight")
            gate = self._lin(h2, p + "mlp.gate_proj.weight")
            up = self._lin(h2, p + "mlp.up_proj.weight")
            sg = 1 / (1 + np.exp(-gate))
            c.update(gate=gate, up=up, sg=sg)
            x = x + self._lin(gate * sg * up, p + "mlp.down_proj.weight")
            if keep:
                layers.append(c)
        xf, rf = self._norm(x, FINAL_NORM)
        if keep:
            self.cache = {"layers": layers, "x": x, "rf": rf, "shape": (b, s)}
        return xf @ W[self.head].T

    def backward(self, dz: np.ndarray, on_output_grad: Callable[[str, np.ndarray], None]) -> None:
        """dz: d loss / d logits of the last forward(keep=True)."""
        cfg, hd, c0, W = self.cfg, self.hd, self.cache, self.W
        b, s = c0["shape"]
        nkv = cfg.num_key_value_heads
        g = cfg.num_attention_heads // nkv
        cos, sin = self._rope(s)
        scale = F(1 / math.sqrt(hd))

        def lin_back(dy, name):
            on_output_grad(name, dy)
            return dy @ W[name]

        def rows(t):                                                           # (B, kv, g, S, hd) -> (B·S, ·)
            return t.transpose(0, 3, 1, 2, 4).reshape(b * s, -1)

        dx = self._norm_back(dz @ W[self.head], c0["x"], c0["rf"], FINAL_NORM)
        for i in reversed(range(cfg.num_hidden_layers)):
            p, c = f"model.layers.{i}.", c0["layers"][i]
            dm = lin_back(dx, p + "mlp.down_proj.weight")
            gate, up, sg = c["gate"], c["up"], c["sg"]
            dh = lin_back(dm * up * sg * (1 + gate * (1 - sg)), p + "mlp.gate_proj.weight") + \
                lin_back(dm * gate * sg, p + "mlp.up_proj.weight")
            dx = dx + self._norm_back(dh, c["xm"], c["r2"], p + "post_attention_layernorm.weight")
            do = lin_back(dx, p + "self_attn.o_proj.weight").reshape(b, s, nkv, g, hd).transpose(0, 2, 3, 1, 4)
            a, v, qr, kr = c["P"], c["v"], c["qr"], c["kr"]
            dv = (a.swapaxes(-1, -2) @ do).sum(2, keepdims=True)
            da = do @ v.swapaxes(-1, -2)
            da = a * (da - (da * a).sum(-1, keepdims=True)) * scale
            dq = da @ kr
            dk = (da.swapaxes(-1, -2) @ qr).sum(2, keepdims=True)
            dq = dq * cos + self._half(dq * sin, 1)
            dk = dk * cos + self._half(dk * sin, 1)
            dh = lin_back(rows(dq), p + "self_attn.q_proj.weight") + \
                lin_back(rows(dk), p + "self_attn.k_proj.weight") + \
                lin_back(rows(dv), p + "self_attn.v_proj.weight")
            dx = dx + self._norm_back(dh, c["x"], c["r1"], p + "input_layernorm.weight")
        self.cache = None


def log_softmax(z: np.ndarray) -> np.ndarray:
    """In z's own type (evaluate.scoring.log_softmax gives float64): a batch's logits, 4 × 256 positions of
    SmolLM2's 49,152 tokens, stay 200 MB."""
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def row_fisher(checkpoint, ids: np.ndarray, progress: Progress | None = None, batch: int = BATCH,
               seed: int = SEED) -> dict[str, np.ndarray]:
    """{matrix name: (rows,) float64} mean over positions of (∂ log p(y) / ∂ out_r)², y sampled from the model at
    every position of the windows `ids` (n, seq_len), for the matrices `weighted` selects."""
    names = [n for n in checkpoint.tensors if weighted(n)]
    model = Decoder(checkpoint.config, {n: checkpoint.load(n) for n in checkpoint.tensors})
    fisher = {n: np.zeros(checkpoint.tensors[n].shape[0], np.float64) for n in names}

    def collect(name, dy):
        if name in fisher:
            fisher[name] += np.einsum("ij,ij->j", dy, dy, dtype=np.float64)

    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, np.int64)
    steps = -(-len(ids) // batch)
    for k in range(steps):
        if progress:
            progress("fisher rows", k, steps)
        z = model.forward(ids[k * batch:(k + 1) * batch], keep=True)
        p = np.exp(log_softmax(z))
        cdf = np.cumsum(p, 1)
        y = np.minimum((cdf < rng.random(len(p))[:, None] * cdf[:, -1:]).sum(1), p.shape[1] - 1)
        p[np.arange(len(p)), y] -= 1                     # d(−log p(y)) / d logits
        del z, cdf
        model.backward(p, collect)
    positions = ids.size
    return {n: f / positions for n, f in fisher.items()}


def unsmoothed_row_fisher(checkpoint, ids: np.ndarray, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """row_fisher of a checkpoint that may be smoothed (smooth.SmoothedCheckpoint), in the unsmoothed rows' terms:
    smoothing divides v_proj's and up_proj's rows by d_r, so their outputs shrink by d_r and the gradients reaching
    them grow by it; F_r is divided by d_r² again (row_relative = 1 / d_r). Then the Fisher factor multiplies the
    smoothed row's own relative step (1 / d_r) instead of replacing it."""
    from .smooth import row_relative

    out = {}
    for name, f in row_fisher(checkpoint, ids, progress).items():
        rel = row_relative(checkpoint, name)
        out[name] = f if rel is None else f * rel * rel
    return out


def relative_steps(fisher: np.ndarray) -> np.ndarray:
    """(rows,) float64: each row's step relative to the matrix's, (F_r / geometric mean)^(−BETA/2) rounded to
    LEVELS_PER_OCTAVE per octave. Rows with no measured information (F_r = 0: never reached by the text) are
    treated as the least informative measured row."""
    f = np.asarray(fisher, np.float64)
    pos = f[f > 0]
    if not pos.size:
        return np.ones(f.shape)
    f = np.maximum(f, pos.min())
    rel = (f / np.exp(np.log(f).mean())) ** (-BETA / 2)
    return 2.0 ** (np.round(np.log2(rel) * LEVELS_PER_OCTAVE) / LEVELS_PER_OCTAVE)
