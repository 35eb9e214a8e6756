"""Measured, not extrapolated: a random checkpoint of Llama-3.2-1B's (or 3B's) exact shape, converted and run like
SmolLM2, so docs/scaling.md can put measured numbers next to its arithmetic.

    python bench/scaling.py [--shape 1b|3b|360m] [--schemes int8,int4-g32] [--modes default,low-memory,strict]
                            [--work /tmp/tinyqmoe-scaling] [--new-tokens 32] [--out bench/results/scaling-1b.json]

1. Writes the checkpoint once (HF folder: config.json with Llama-3.2's dimensions and llama3 rope scaling, bf16
   safetensors sharded every few layers so that writing never holds the model, weights ~ N(0, 0.02) like the
   architecture's initialisation, norms near 1, tied embedding; the byte-level BPE tokenizer of tests/tiny.py grown
   to the 128,256-entry vocabulary). Nothing is downloaded: the *values* are random, the sizes, shapes and code
   paths are the real model's.
2. Builds each scheme with `python -m converter build`, in its own process: wall time and that process's peak RSS.
3. Runs each bundle and mode with bench/generate.py's child (own process: 41-token prompt, `--new-tokens` greedy
   tokens, 1 thread): prefill/decode tok/s, load time, peak RSS and the session's share over the runtime weight
   bytes + KV cache — the same columns and ratios as the SmolLM2 table in the README.

Random weights compress worse than trained ones (no outliers to spend steps on: every code is as likely as the
Gaussian makes it), so bundle sizes are an upper bound; run-time memory and speed do not depend on the values.
A benchmark, not a test: the 1B shape takes ~10 minutes and ~6 GB of disk here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Llama-3.2's published dimensions (config.json of meta-llama/Llama-3.2-1B and -3B); "smoke" is for the test
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
    # between SmolLM2-135M and Llama-3.2-1B: SmolLM2-360M's dimensions (its config.json), the Llama architecture
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, head_dim=64, vocab_size=49152),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512),
}
COMMON = dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)
LAYERS_PER_SHARD = 4


def write_checkpoint(folder: Path, shape: str, seed: int = 0) -> int:
    """The HF folder, shard by shard; returns the parameter count. Skipped when config.json is already there."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from tiny import SPECIALS, tiny_tokenizer, to_bf16_bits

    cfg = {**SHAPES[shape], **COMMON}
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd, nh, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    params = V * H + L * (2 * H + H * nh * hd * 2 + H * kv * hd * 2 + 3 * H * I) + H
    if (folder / "config.json").exists():
        return params
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def bf16(a: np.ndarray) -> np.ndarray:
        return to_bf16_bits(a).view(ml_dtypes.bfloat16)

    def w(*s: int) -> np.ndarray:
        return bf16(rng.standard_normal(s, dtype=np.float32) * np.float32(0.02))

    def norm() -> np.ndarray:
        return bf16(1.0 + 0.05 * rng.standard_normal(H, dtype=np.float32))

    shards: list[dict[str, np.ndarray]] = [{"model.embed_tokens.weight": w(V, H)}]
    for i in range(L):
        if i % LAYERS_PER_SHARD == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1].update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                           p + "self_attn.q_proj.weight": w(nh * hd, H), p + "self_attn.k_proj.weight": w(kv * hd, H),
                           p + "self_attn.v_proj.weight": w(kv * hd, H), p + "self_attn.o_proj.weight": w(H, nh * hd),
                           p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H),
                           p + "mlp.down_proj.weight": w(H, I)})
        if i % LAYERS_PER_SHARD == LAYERS_PER_SHARD - 1 or i == L - 1:
            if i == L - 1:
                shards[-1]["model.norm.weight"] = norm()
            shards[-1] = _save_shard(shards[-1], len(shards), tmp, save_file)
    shards[0] = _save_shard(shards[0], 1, tmp, save_file)
    n = len(shards)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        (tmp / f"shard-{k}.safetensors").rename(tmp / final)
        weight_map.update({name: final for name in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tok, tok_cfg = tiny_tokenizer(V)
    (tmp / "tokenizer.json").write_text(json.dumps(tok))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    specials = {s: V - len(SPECIALS) + i for i, s in enumerate(SPECIALS)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **cfg, "tie_word_embeddings": True,
              "bos_token_id": specials["<|begin_of_text|>"], "eos_token_id": [specials["<|eot_id|>"]],
              "torch_dtype": "bfloat16", "hidden_act": "silu",
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(folder)
    return params


def _save_shard(tensors: dict[str, np.ndarray], k: int, folder: Path, save_file) -> list[str]:
    save_file(tensors, str(folder / f"shard-{k}.safetensors"))
    return list(tensors)


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stderr) of `python -c WRAP cmd...`: WRAP runs the command as its only child
    and prints that child's peak RSS as its last stdout line. Raises with the stderr on failure."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{err[-2000:]}")
    return wall, json.loads(out.strip().splitlines()[-1])["maxrss_mib"], err


WRAP = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(json.dumps({'maxrss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})); "
        "sys.exit(r.returncode)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--schemes", default="int8,int4-g32")
    ap.add_argument("--modes", default="default,low-memory,strict")
    ap.add_argument("--work", default="/tmp/tinyqmoe-scaling", help="checkpoint and bundles (kept for reruns)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="default bench/results/scaling-SHAPE.json")
    args = ap.parse_args()
    from converter.config import LlamaConfig

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    work = Path(args.work)
    ckpt = work / f"llama-3.2-{args.shape}-random"
    t0 = time.perf_counter()
    params = write_checkpoint(ckpt, args.shape)
    print(f"checkpoint {ckpt} ({params / 1e9:.2f} B parameters) in {time.perf_counter() - t0:.0f} s", flush=True)
    result: dict = {"shape": args.shape, "parameters": params, "new_tokens": args.new_tokens, "builds": [],
                    "runs": []}
    for scheme in args.schemes.split(","):
        bundle = work / f"{args.shape}-{scheme}"
        measured = work / f"{bundle.name}.build.json"      # kept beside the bundle, so a rerun reports it again
        if not (bundle / "manifest.json").exists() or not measured.exists():
            wall, rss, _ = run_measured([sys.executable, "-c", WRAP, sys.executable, "-m", "converter", "build",
                                         str(ckpt), "--scheme", scheme, "--out", str(bundle), "--force"], env)
            measured.write_text(json.dumps({"scheme": scheme, "seconds": wall, "peak_rss_mib": rss,
                                            "load_average": os.getloadavg()}))
        build = json.loads(measured.read_text())
        result["builds"].append(build)
        print(f"build {scheme}: {build['seconds']:.0f} s, peak RSS {build['peak_rss_mib']:.0f} MiB", flush=True)
        m = json.loads((bundle / "manifest.json").read_text())
        c = LlamaConfig.from_dict(m["config"])
        for mode in args.modes.split(","):
            out = subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--child", str(bundle),
                                  "--new-tokens", str(args.new_tokens), "--mode", mode],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{scheme} {mode} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            positions = r["prompt_tokens"] + r["new_tokens"]
            kv_mb = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 * positions / 1e6
            weights_mb = m["totals"]["runtime_bytes"] / 1e6
            row = {"scheme": scheme, "mode": mode, "bundle_mb": m["totals"]["bundle_bytes"] / 1e6,
                   "runtime_weight_mb": weights_mb, "kv_cache_mb": kv_mb, **r,
                   "session_mib": r["peak_rss_mib"] - r["ready_rss_mib"],
                   "above_start_mib": r["peak_rss_mib"] - r["start_rss_mib"]}
            row["session_ratio"] = row["session_mib"] * 1.048576 / (weights_mb + kv_mb)
            row["above_start_ratio"] = row["above_start_mib"] * 1.048576 / (weights_mb + kv_mb)
            result["runs"].append(row)
            print(f"{scheme:9} {mode:10} prefill {r['prefill_tok_s']:7.1f} tok/s  decode {r['decode_tok_s']:6.2f} tok/s  "
                  f"load {r['load_s']:5.1f} s  peak {r['peak_rss_mib']:6.0f} MiB  session {row['session_mib']:6.0f} MiB "
                  f"({row['session_ratio']:.2f}x of {weights_mb + kv_mb:.0f} MB weights+KV)", flush=True)
    result["load_average"] = os.getloadavg()
    out_path = Path(args.out or ROOT / "bench" / "results" / f"scaling-{args.shape}.json")
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
