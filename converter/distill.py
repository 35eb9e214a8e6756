"""Distillation of a quantized model's free parameters against its float model (`--distill TOKENS`).

After calibration every linear layer's codes are fixed, but two sets of numbers in the bundle are still floats
that cost (almost) no bits: each weight row's step (the float16 group scales of its row, all multiplied by one
factor per row) and the RMSNorm weights. This module fits them end to end: the quantized model (codes × row
factor) is run forward and backward in numpy on text sampled from the float model, and the factors and norm
weights follow Adam down the mean KL(float ‖ quantized) per token. Codes do not change, so neither does the
entropy or the size of the bundle.

SmolLM2 int8-e3.15 + int8-e3.5 (GPTQ, smoothed, pydoc calibration), KL over the evaluation texts 0.392 → 0.327
with 16,384 sampled tokens (docs/quality.md, session 21). Changing the codes themselves (straight-through
training of the weights) was measured too and diverged within a few steps at every learning rate that moved any
code in this budget of steps; it is not offered.

The backward pass is written out by hand (RMSNorm, rotate-half RoPE, causal grouped-query attention, SwiGLU, the
tied or untied lm_head), and tests/test_distill.py checks it against finite differences. Cost per step of B × S
tokens: about three float forward passes (SmolLM2, 4 × 256 tokens: ~5 s on 2 cores), with both models' float32
weights and one step's activations in memory (SmolLM2: ~3.5 GB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import LlamaConfig, rope_inv_freq
from .errors import QuantError
from .quant import Quantized, get_scheme

F = np.float32
EMBED, HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DistillOptions:
    tokens: int = 16384            # sampled text: tokens // seq_len windows
    seq_len: int = 256
    batch: int = 4                 # windows per step
    epochs: int = 2                # passes over the text (cosine learning-rate decay over all of them)
    lr: float = 1e-3               # Adam, on the row factors and on norm weight / its initial value
    seed: int = 1                  # the text's sampling seed (calibration's generated text uses 0)

    def check(self) -> None:
        if self.seq_len < 2 or self.tokens < self.seq_len:
            raise QuantError(f"--distill needs at least one window of {self.seq_len} tokens, got {self.tokens}")
        if self.batch < 1 or self.epochs < 1 or not 0 < self.lr < 1:
            raise QuantError("distillation needs batch ≥ 1, epochs ≥ 1 and a learning rate in (0, 1)")

    def record(self) -> dict:
        return {"tokens": self.windows * self.seq_len, "seq_len": self.seq_len, "batch": self.batch,
                "epochs": self.epochs, "lr": self.lr, "seed": self.seed, "text": "generated",
                "trained": "row factors of every quantized matrix, RMSNorm weights"}

    @property
    def windows(self) -> int:
        return self.tokens // self.seq_len


class Llama:
    """The decoder over whole windows, numpy float32: forward keeping what backward needs, and the gradients of
    the row factors (`alpha`, one per output row of each matrix) and of the 1-D tensors (the norms)."""

    def __init__(self, cfg: LlamaConfig, weights: dict[str, np.ndarray]):
        self.cfg = cfg
        self.W = {n: np.ascontiguousarray(w, F) for n, w in weights.items()}
        self.mats = [n for n, w in self.W.items() if w.ndim == 2]
        self.norms = [n for n, w in self.W.items() if w.ndim == 1]
        self.alpha = {n: np.ones(self.W[n].shape[0], F) for n in self.mats}
        self.head = HEAD if HEAD in self.W else EMBED
        self.hd = cfg.head_dim
        self.inv = np.asarray(rope_inv_freq(cfg), np.float64)
        self.cache = None

    def _rope(self, s: int):
        e = np.outer(np.arange(s), self.inv)
        e = np.concatenate([e, e], -1)
        return np.cos(e).astype(F), np.sin(e).astype(F)

    @staticmethod
    def _half(x, sign):                      # rotate-half (sign -1) and its transpose (sign +1)
        h = x.shape[-1] // 2
        return np.concatenate([sign * x[..., h:], -sign * x[..., :h]], -1)

    def _lin(self, x, n):
        y0 = x @ self.W[n].T
        return y0 * self.alpha[n], y0

    def _lin_back(self, dy, y0, n, grads):
        grads[("alpha", n)] += (dy * y0).sum(0)
        return (dy * self.alpha[n]) @ self.W[n]

    def _norm(self, x, n):
        r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + F(self.cfg.rms_norm_eps))
        return x * r * self.W[n], r

    def _norm_back(self, dy, x, r, n, grads):
        grads[("norm", n)] += (dy * x * r).sum(0)
        u = dy * self.W[n]
        return r * u - x * (r ** 3) * (u * x).mean(-1, keepdims=True)

    def forward(self, ids: np.ndarray, keep: bool = False) -> np.ndarray:
        """ids (B, S) -> logits (B·S, V)."""
        cfg, hd = self.cfg, self.hd
        b, s = ids.shape
        nkv = cfg.num_key_value_heads
        g = cfg.num_attention_heads // nkv
        cos, sin = self._rope(s)
        x = (self.W[EMBED][ids] * self.alpha[EMBED][ids][..., None]).reshape(b * s, -1)
        mask = np.triu(np.full((s, s), -np.inf, F), 1)
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            c = {"x": x}
            h, c["r1"] = self._norm(x, p + "input_layernorm.weight")
            c["h1"] = h
            q, c["q0"] = self._lin(h, p + "self_attn.q_proj.weight")
            k, c["k0"] = self._lin(h, p + "self_attn.k_proj.weight")
            v, c["v0"] = self._lin(h, p + "self_attn.v_proj.weight")
            q = q.reshape(b, s, nkv, g, hd).transpose(0, 2, 3, 1, 4)            # (B, kv, g, S, hd)
            k = k.reshape(b, s, nkv, 1, hd).transpose(0, 2, 3, 1, 4)
            v = v.reshape(b, s, nkv, 1, hd).transpose(0, 2, 3, 1, 4)
            qr = q * cos + self._half(q, -1) * sin
            kr = k * cos + self._half(k, -1) * sin
            a = (qr @ kr.swapaxes(-1, -2)) * F(1 / math.sqrt(hd)) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            o = (a @ v).transpose(0, 3, 1, 2, 4).reshape(b * s, -1)
            c.update(qr=qr, kr=kr, v=v, P=a, o=o)
            y, c["o0"] = self._lin(o, p + "self_attn.o_proj.weight")
            x = x + y
            c["xm"] = x
            h2, c["r2"] = self._norm(x, p + "post_attention_layernorm.weight")
            c["h2"] = h2
            gate, c["g0"] = self._lin(h2, p + "mlp.gate_proj.weight")
            up, c["u0"] = self._lin(h2, p + "mlp.up_proj.weight")
            sg = 1 / (1 + np.exp(-gate))
            c.update(gate=gate, up=up, sg=sg)
            y, c["d0"] = self._lin(gate * sg * up, p + "mlp.down_proj.weight")
            x = x + y
            if keep:
                layers.append(c)
        xf, rf = self._norm(x, FINAL_NORM)
        z0 = xf @ self.W[self.head].T
        if keep:
            self.cache = {"layers": layers, "x": x, "rf": rf, "z0": z0, "ids": ids}
        return z0 * self.alpha[self.head]

    def backward(self, dz: np.ndarray) -> dict:
        """dz: d loss / d logits of the last forward(keep=True) -> {("alpha"|"norm", name): gradient}."""
        cfg, hd, c0 = self.cfg, self.hd, self.cache
        ids = c0["ids"]
        b, s = ids.shape
        nkv = cfg.num_key_value_heads
        g = cfg.num_attention_heads // nkv
        cos, sin = self._rope(s)
        grads = {("alpha", n): np.zeros_like(a) for n, a in self.alpha.items()}
        grads.update({("norm", n): np.zeros_like(self.W[n]) for n in self.norms})
        grads[("alpha", self.head)] += (dz * c0["z0"]).sum(0)
        dx = self._norm_back((dz * self.alpha[self.head]) @ self.W[self.head], c0["x"], c0["rf"], FINAL_NORM, grads)
        scale = F(1 / math.sqrt(hd))
        for i in reversed(range(cfg.num_hidden_layers)):
            p, c = f"model.layers.{i}.", c0["layers"][i]
            dm = self._lin_back(dx, c["d0"], p + "mlp.down_proj.weight", grads)
            gate, up, sg = c["gate"], c["up"], c["sg"]
            dh = self._lin_back(dm * up * sg * (1 + gate * (1 - sg)), c["g0"], p + "mlp.gate_proj.weight", grads) + \
                self._lin_back(dm * gate * sg, c["u0"], p + "mlp.up_proj.weight", grads)
            dx = dx + self._norm_back(dh, c["xm"], c["r2"], p + "post_attention_layernorm.weight", grads)
            do = self._lin_back(dx, c["o0"], p + "self_attn.o_proj.weight", grads)
            do = do.reshape(b, s, nkv, g, hd).transpose(0, 2, 3, 1, 4)
            a, v, qr, kr = c["P"], c["v"], c["qr"], c["kr"]
            dv = (a.swapaxes(-1, -2) @ do).sum(2, keepdims=True)
            da = do @ v.swapaxes(-1, -2)
            da = a * (da - (da * a).sum(-1, keepdims=True)) * scale
            dq = da @ kr
            dk = (da.swapaxes(-1, -2) @ qr).sum(2, keepdims=True)
            dq = dq * cos + self._half(dq * sin, 1)
            dk = dk * cos + self._half(dk * sin, 1)

            def rows(t):                                                       # (B, kv, g, S, hd) -> (B·S, ·)
                return t.transpose(0, 3, 1, 2, 4).reshape(b * s, -1)
            dh = self._lin_back(rows(dq), c["q0"], p + "self_attn.q_proj.weight", grads) + \
                self._lin_back(rows(dk), c["k0"], p + "self_attn.k_proj.weight", grads) + \
                self._lin_back(rows(dv), c["v0"], p + "self_attn.v_proj.weight", grads)
            dx = dx + self._norm_back(dh, c["x"], c["r1"], p + "input_layernorm.weight", grads)
        flat = ids.reshape(-1)
        np.add.at(grads[("alpha", EMBED)], flat, (dx * self.W[EMBED][flat]).sum(-1))
        self.cache = None
        return grads


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_and_grad(z: np.ndarray, ref_logp: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean KL(ref ‖ softmax(z)) over rows, and its gradient with respect to z."""
    lq = log_softmax(z)
    p = np.exp(ref_logp)
    n = z.shape[0]
    return float((p * (ref_logp - lq)).sum() / n), ((np.exp(lq) - p) / n).astype(F)


def scale_rows(q: Quantized, alpha: np.ndarray) -> Quantized:
    """The same codes with each row's step multiplied by alpha[row] (float16 scales, rounded once)."""
    if q.scales is None or q.scales.shape[0] != q.shape[0]:
        raise QuantError(f"{q.scheme}: no per-row scales to fold the distilled row factors into")
    scales = (q.scales.astype(np.float32) * alpha[:, None].astype(np.float32)).astype(q.scales.dtype)
    mins = None if q.mins is None else (q.mins.astype(np.float32) * alpha[:, None]).astype(q.mins.dtype)
    return Quantized(q.scheme, q.shape, q.symbols, scales, q.zeros, group=q.group, max_error=q.max_error,
                     rms_error=q.rms_error, extra=q.extra, mins=mins, mults=q.mults)


class TunedNorms:
    """A loaders checkpoint whose norm weights are the distilled ones; everything else is the wrapped one's."""

    def __init__(self, checkpoint, norms: dict[str, np.ndarray]):
        self._checkpoint = checkpoint
        self._norms = norms

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)

    def load(self, name: str) -> np.ndarray:
        return self._norms[name].copy() if name in self._norms else self._checkpoint.load(name)


def distill(checkpoint, calib, opts: DistillOptions, progress: Progress | None = None,
            text: np.ndarray | None = None):
    """Fit the row factors of calib's quantized matrices and the norm weights; returns (the checkpoint with the
    tuned norms, the record for the manifest). calib's tensors are replaced by their rescaled versions. `text`:
    windows (n, seq_len) of token ids; default sampled from the float model (selftext.generated_ids)."""
    opts.check()
    cfg: LlamaConfig = checkpoint.config
    names = list(checkpoint.tensors)
    missing = [n for n in names if len(checkpoint.tensors[n].shape) == 2 and n not in calib]
    if missing:
        raise QuantError(f"--distill fits the calibrated tensors, and {missing[0]} is not one "
                         "(add --calib-embedding when the embedding is quantized)")
    if text is None:
        from .selftext import generated_ids
        if progress:
            progress("distill: sampling text from the float model", 0, 1)
        text, _ = generated_ids(checkpoint, opts.windows, opts.seq_len, seed=opts.seed)
    text = np.asarray(text, np.int64)[:opts.windows]
    floats = {n: checkpoint.load(n) for n in names}
    teacher = Llama(cfg, floats)
    student = Llama(cfg, {n: (get_scheme(calib.schemes[n]).dequantize(calib.get(n)) if floats[n].ndim == 2
                              else floats[n]) for n in names})
    del floats
    norm0 = {n: student.W[n].copy() for n in student.norms}
    params = {("alpha", n): student.alpha[n] for n in student.mats}
    params.update({("norm", n): np.ones_like(norm0[n]) for n in student.norms})   # norm = initial · factor
    m1 = {k: np.zeros_like(v) for k, v in params.items()}
    m2 = {k: np.zeros_like(v) for k, v in params.items()}
    batches = max(1, len(text) // opts.batch)
    steps = opts.epochs * batches
    cache_teacher = len(text) * opts.seq_len * cfg.vocab_size * 2 <= 2 << 30   # float16 log-probs up to 2 GiB
    ref: dict[int, np.ndarray] = {}
    losses = []
    for step in range(steps):
        i = step % batches
        ids = text[i * opts.batch:(i + 1) * opts.batch]
        lp = ref.get(i)
        if lp is None:
            lp = log_softmax(teacher.forward(ids)).astype(np.float16)
            if cache_teacher:
                ref[i] = lp
        for n in student.norms:
            student.W[n] = norm0[n] * params[("norm", n)]
        loss, dz = kl_and_grad(student.forward(ids, keep=True), lp.astype(F))
        grads = student.backward(dz)
        del dz
        lr = opts.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        t = step + 1
        for k, p in params.items():
            gr = grads[k] * norm0[k[1]] if k[0] == "norm" else grads[k]
            m1[k] = 0.9 * m1[k] + 0.1 * gr
            m2[k] = 0.999 * m2[k] + 0.001 * gr * gr
            p -= (lr * (m1[k] / (1 - 0.9 ** t)) / (np.sqrt(m2[k] / (1 - 0.999 ** t)) + 1e-8)).astype(F)
        losses.append(loss)
        if progress:
            progress(f"distill: KL {np.mean(losses[-batches:]):.4f}", step + 1, steps)
    for n in student.mats:
        calib.spill.put(n, scale_rows(calib.get(n), student.alpha[n]))
    norms = {n: (norm0[n] * params[("norm", n)]).astype(F) for n in student.norms}
    first, last = float(np.mean(losses[:batches])), float(np.mean(losses[-batches:]))
    record = {**opts.record(), "train_kl_first_epoch": round(first, 5), "train_kl_last_epoch": round(last, 5)}
    return TunedNorms(checkpoint, norms), record
