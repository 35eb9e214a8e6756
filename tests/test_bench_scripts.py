"""Smoke runs of the single-purpose benchmarks on the tiny model (their numbers mean nothing here; that they run
and write what the README quotes does): bench/generate.py (the three memory modes) and bench/chat_turns.py; and
bench/codec.py's native decoder that writes whole tensors into fresh memory."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.bundle import BuildOptions, write_bundle
from converter.loaders import open_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The tiny model under the name the scripts look for (they build SmolLM2 when it is missing)."""
    import tiny
    d = tmp_path_factory.mktemp("benchb")
    tiny.write_hf(d / "hf", dtype="f32")
    write_bundle(open_checkpoint(d / "hf"), d / "b" / "smollm2-int8", BuildOptions(scheme="int8", chunk_symbols=4096))
    return d / "b"


def run(args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_generate_bench_measures_every_mode(bundles, tmp_path):
    out = tmp_path / "generate.json"
    text = run(["bench/generate.py", "--bundles", str(bundles), "--schemes", "int8", "--reps", "1",
                "--new-tokens", "4", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert [r["mode"] for r in doc["rows"]] == ["default", "low-memory", "strict"]
    for r in doc["rows"]:
        assert r["decode_tok_s"]["median"] > 0 and r["runs"][0]["new_tokens"] == 4
        assert r["peak_rss_mib"]["median"] > r["above_start_mib"]["median"] > r["session_mib"]["median"] > 0
        assert r["session_ratio"] > 0
        # the divisor is the weights as the session holds them: int8's float16 scales are float32 there
        assert r["runtime_weight_mb"] > r["stored_weight_mb"] > 0 and r["session_ratio"] < r["session_ratio_stored"]
    assert "strict" in text


def test_chat_turns_bench_reuses_the_cache(bundles, tmp_path):
    out = tmp_path / "chat.json"
    run(["bench/chat_turns.py", "--bundles", str(bundles), "--bundle", "smollm2-int8", "--no-page", "--turns", "3",
         "--reps", "1", "--new-tokens", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["cpu"]
    kept = [r for r in rows if r["mode"].startswith("cache kept")]
    whole = [r for r in rows if r["mode"].startswith("whole")]
    assert len(kept) == len(whole) == 3
    assert kept[0]["prefilled"] == kept[0]["prompt_tokens"] and whole[2]["prefilled"] == whole[2]["prompt_tokens"]
    assert kept[2]["prefilled"] < kept[2]["prompt_tokens"]


def test_scaling_bench_end_to_end(tmp_path):
    """bench/scaling.py on its smoke shape: the sharded checkpoint, a measured build, the three memory modes."""
    out = tmp_path / "scaling.json"
    run(["bench/scaling.py", "--shape", "smoke", "--schemes", "int8", "--work", str(tmp_path / "w"),
         "--new-tokens", "3", "--out", str(out)])
    doc = json.loads(out.read_text())
    ckpt = json.loads((tmp_path / "w" / "llama-3.2-smoke-random" / "model.safetensors.index.json").read_text())
    assert len(set(ckpt["weight_map"].values())) == 3          # embedding, layers 0-3, layer 4 + final norm
    assert doc["builds"][0]["seconds"] > 0 and doc["builds"][0]["peak_rss_mib"] > 20
    assert [r["mode"] for r in doc["runs"]] == ["default", "low-memory", "strict"]
    for r in doc["runs"]:
        assert r["new_tokens"] == 3 and r["decode_tok_s"] > 0
        assert r["peak_rss_mib"] > r["above_start_mib"] > r["session_mib"] > 0


def test_peak_rss_is_this_process_own(tmp_path):
    """A child started by a process holding 300 MiB reports its own peak, not the parent's (ru_maxrss would)."""
    import numpy as np
    held = np.ones(300 << 20, np.uint8)
    out = subprocess.run([sys.executable, "-c", "from converter.cli import peak_rss_mib; print(peak_rss_mib())"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert float(out) < 200, out
    del held


@pytest.mark.skipif(not any(shutil.which(c) for c in ("gcc", "clang")),
                    reason="no C compiler (tools/setup.sh installs clang)")
def test_codec_bench_native_fresh_tensors_decode_what_python_decodes(tmp_path):
    """bench/codec.py's like-for-like native row: chunks grouped into tensors as the page groups them, each tensor
    a fresh mapping, every chunk decoded at its offset — the bytes must be Python's, tensor by tensor."""
    spec = importlib.util.spec_from_file_location("bench_codec", ROOT / "bench" / "codec.py")
    bench_codec = sys.modules["bench_codec"] = importlib.util.module_from_spec(spec)   # dataclasses look it up
    spec.loader.exec_module(bench_codec)
    from converter import codec, lzw

    rng = np.random.default_rng(7)
    symbols = np.clip(np.rint(rng.normal(0, 20, 5 * 4096)), -127, 127).astype(np.int8).view(np.uint8)
    chunks = [codec.encode_chunk(symbols[i:i + 4096], 256, lzw.LAYOUT_U8) for i in range(0, len(symbols), 4096)]
    lengths = [len(codec.decode_chunk(c)) for c in chunks]
    targets = bench_codec.tensor_targets(lengths, per=2)
    assert [t["tensor"] for t in targets] == [0, 0, 1, 1, 2]
    assert [t["outOff"] for t in targets] == [0, lengths[0], 0, lengths[2], 0]
    assert [t["nbytes"] for t in targets] == [lengths[0] + lengths[1]] * 2 + [lengths[2] + lengths[3]] * 2 + [lengths[4]]
    native = bench_codec.Native(tmp_path, "gcc" if shutil.which("gcc") else "clang")
    assert native.decode_tensors_fresh(chunks, targets) == sum(lengths)
    assert native.fresh_bytes() == b"".join(codec.decode_chunk(c) for c in chunks)
    native.release()
    assert native.fresh_bytes() == b""


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_tunstall_floor_of_bench_compression():
    """The 16-bit Tunstall floor the compression table reports: exact on a uniform alphabet (the raw bits alone),
    above the entropy on a skewed one, falling as the tree grows, and never above what QZ itself writes."""
    from converter import wasm_codec
    c = _bench_module("compression")
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 16, 65536).astype(np.uint8)
    assert c.tunstall_bound(uniform, 16) == pytest.approx(c.entropy_bits(uniform, 16), rel=1e-3)
    skewed = rng.choice(8, 65536, p=[0.5, 0.2, 0.1, 0.08, 0.06, 0.03, 0.02, 0.01]).astype(np.uint8)
    h = c.entropy_bits(skewed, 8)
    floors = [c.tunstall_bound(skewed, 8, width=w) for w in (9, 12, 16)]
    assert h < floors[2] < floors[1] < floors[0]
    assert floors[2] <= 8 * len(wasm_codec.encode_chunk(skewed, 8, 0, 0))
