"""Sizes of our SmolLM2 bundles, counted honestly and counted the flattering ways (issue 6, requirement 6).

    python bench/sizes.py            # builds the missing bundles into bundles/frontier (~3 min), then counts

Writes bench/results/sizes.json and the tables of docs/sizes.md (between the <!-- tables --> markers; the prose
around them is written by hand). Bundles are shared with bench/frontier.py (same folder, same names).

Every size is read from the bundle's manifest and the files on disk — nothing is estimated. "All-in" is every byte
of the bundle folder (blobs, model.onnx, tokenizer files, manifest.json + tables.json), the bytes a browser downloads. The
reference sizes are the same model's 134,515,008 parameters as float32 (538.1 MB) and as float16/bf16 (269.0 MB,
how Hugging Face checkpoints ship), and the 98.4 MB Q4_1 GGUF the weights actually come from.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converter.bundle import BuildOptions, load, write_bundle  # noqa: E402
from converter.loaders import default_model_path, open_checkpoint  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sizes.json"
DOC = ROOT / "docs" / "sizes.md"
# (--scheme, --embed-scheme) as a user would build them; None = the default embedding (int8 for quantized schemes)
BUNDLES = [("f32", None), ("f16", None), ("int8", "int8"), ("q8_0", "q8_0"), ("source", None), ("int4-g32", "int8"),
           ("int4-g64", "int4-g64"), ("int2-g64", "int4-g64"), ("ternary", "int8"), ("ternary-g64", "int4-g64")]
EMBED = ("model.embed_tokens.weight", "lm_head.weight")


def bundle_dir(root: Path, scheme: str, embed: str | None) -> Path:
    from frontier import bundle_name                                    # bench/frontier.py's names
    return root / bundle_name(scheme, embed)


def count(path: Path) -> dict:
    """Bytes of one bundle, split the ways a headline ratio can (mis)count them."""
    b = load(path)
    m = b.manifest
    stored = {e["name"]: e["stored_bytes"] for e in m["initializers"]}
    linear_codes = linear_side = embed = norms = 0
    linear_params = 0
    for t in m["tensors"]:
        n = 1
        for d in t["shape"]:
            n *= d
        own = [stored[i] for i in t["initializers"]]
        if len(t["shape"]) == 1:
            norms += sum(own)
        elif t["name"] in EMBED:
            embed += sum(own)
        else:
            linear_params += n
            codes = [stored[i] for i in t["initializers"] if i in (t["name"], t["name"] + ".q")]
            linear_codes += sum(codes)
            linear_side += sum(own) - sum(codes)                     # scales, zero points, minimums
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    # the warm-up model the page runs while the weights load (converter/warmup_model.py): downloaded too
    warmup = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.parent != path)
    total = sum(files.values()) + warmup
    return {"name": path.name, "scheme": m["scheme"], "embed_scheme": m["embed_scheme"],
            "parameters": m["totals"]["parameters"], "linear_parameters": linear_params,
            "all_in": total, "blobs": sum(files[f] for f in files if f.endswith(".qzb")),
            "linear_codes": linear_codes, "linear_scales": linear_side, "embedding": embed, "norms": norms,
            "graph": files.get("model.onnx", files.get("model.onnx.qz", files.get("model.onnx.zlib", 0))),  # plain/QZ/zlib
            "tokenizer": sum(v for k, v in files.items() if k.startswith("tokenizer")),
            "manifest": files["manifest.json"] + files.get("tables.json", files.get("tables.json.qz",
                                                                                  files.get("tables.json.zlib", 0))),
            "warmup_model": warmup, "runtime_bytes": m["totals"]["runtime_bytes"]}


def nominal_bits(scheme: str) -> float:
    """The bits a scheme's name advertises (ternary: log2 3), ignoring scales, embedding and coding."""
    if scheme.startswith("ternary"):
        return 1.58
    return {"f32": 32, "f16": 16}.get(scheme) or float(scheme.lstrip("intq").split("-")[0].split("_")[0])


def tables(rows: list[dict], gguf_bytes: int) -> str:
    P = rows[0]["parameters"]
    f32, f16 = 4 * P, 2 * P
    mb = lambda n: f"{n / 1e6:,.1f}"  # noqa: E731
    out = [f"Reference sizes: float32 {mb(f32)} MB, float16/bf16 {mb(f16)} MB, the source GGUF (Q4_1 + Q8_0 "
           f"embedding) {mb(gguf_bytes)} MB; {P:,} parameters.", "",
           "### Every byte counted", "",
           "| bundle (linear + embedding) | all-in MB | bits/weight all-in | vs f32 | vs f16 | vs the GGUF |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scheme']} + {r['embed_scheme']} | {mb(r['all_in'])} | {8 * r['all_in'] / P:.3f} | "
                   f"{f32 / r['all_in']:.2f}× | {f16 / r['all_in']:.2f}× | {gguf_bytes / r['all_in']:.2f}× |")
    out += ["", "### The same bundles, counted the flattering ways (ratio against float32)", "",
            "Each column drops one more thing from the count (left to right); the last is what a headline quoting "
            "\"N-bit weights\" implies.", "",
            "| bundle | all-in | blobs only (no graph, tokenizer, manifest) | linear layers only (codes + scales, "
            "against their own f32) | linear codes only (no scales) | nominal: 32 / bits |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        linear_f32 = 4 * r["linear_parameters"]
        out.append(f"| {r['scheme']} + {r['embed_scheme']} | {f32 / r['all_in']:.2f}× | {f32 / r['blobs']:.2f}× | "
                   f"{linear_f32 / (r['linear_codes'] + r['linear_scales']):.2f}× | "
                   f"{linear_f32 / r['linear_codes']:.2f}× | {32 / nominal_bits(r['scheme']):.2f}× |")
    out += ["", "### Where the bytes are (MB)", "",
            "| bundle | linear codes | linear scales / zero points / minimums | embedding | norms | model.onnx | "
            "tokenizer | manifest |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scheme']} + {r['embed_scheme']} | {mb(r['linear_codes'])} | {mb(r['linear_scales'])} | "
                   f"{mb(r['embedding'])} | {r['norms'] / 1e6:.2f} | {mb(r['graph'])} | {mb(r['tokenizer'])} | "
                   f"{mb(r['manifest'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", default=str(ROOT / "bundles" / "frontier"))
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.bundles)
    source = default_model_path()
    ck = None
    rows = []
    for scheme, embed in BUNDLES:
        path = bundle_dir(root, scheme, embed)
        if args.rebuild or not (path / "manifest.json").exists():
            ck = ck or open_checkpoint(source)
            print(f"build {path.name}", flush=True)
            write_bundle(ck, path, BuildOptions(scheme=scheme, embed_scheme=embed, force=True, name=path.name,
                                                fp16_graph=False))
        rows.append(count(path))
    text = tables(rows, source.stat().st_size)
    print(text)
    RESULTS.write_text(json.dumps({"model": source.name, "gguf_bytes": source.stat().st_size, "bundles": rows},
                                  indent=1) + "\n")
    doc = DOC.read_text(encoding="utf-8")
    start, end = "<!-- tables: generated by bench/sizes.py -->", "<!-- end of tables -->"
    if start not in doc or end not in doc:
        raise SystemExit(f"{DOC}: markers {start} ... {end} not found")
    doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n\n{text}\n\n{end}", doc, flags=re.S)
    DOC.write_text(doc, encoding="utf-8")
    print(f"wrote {RESULTS} and {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
