"""llama.cpp's own quantizer on the default model's float weights: the k-quant and i-quant mixes a llama.cpp user
would pick at 2-5 bits/weight, as GGUF files for `bench/frontier.py --gguf` (issue 6's frontier, beyond the types the
`gguf` package can quantize in Python). Optional: needs llama-cpp-python (its `llama_model_quantize`), which builds
llama.cpp from source (pip install llama-cpp-python; here with CMAKE_ARGS="-DGGML_NATIVE=ON").

    python bench/llamacpp_quants.py --out /tmp/llamacpp-quants                 # the default mixes
    python bench/llamacpp_quants.py --out DIR --types Q3_K_M,IQ3_S

The float model is the source GGUF dequantized by the `gguf` package, tensor for tensor, into an F32 GGUF with the
source's metadata (tokenizer included) and llama.cpp's own tensor layout. llama.cpp then quantizes that file with
each mix's defaults, no importance matrix (llama.cpp refuses the 1- and 2-bit i-quants without one: they are not
in the default list). SmolLM2's rows of 576 do not split into the k-quants' and i-quants' blocks of 256, so
llama.cpp itself falls back to a 32-block type for those tensors (it logs which); the files measure what a
llama.cpp user gets for this model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL", "Q4_K_S", "Q4_K_M",
         "Q5_K_M", "Q6_K")


def float_gguf(source: Path, out: Path) -> Path:
    """The source GGUF with every tensor dequantized to F32 (same names, shapes, metadata)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(dequantize(t.data, t.tensor_type), np.float32))   # numpy (rows, cols)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize(f32: Path, out: Path, type_name: str, threads: int) -> Path:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise SystemExit(f"llama-cpp-python {llama_cpp.__version__} has no LLAMA_FTYPE_MOSTLY_{type_name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0 or not out.exists():
        raise SystemExit(f"llama.cpp failed to quantize {f32} to {type_name} (return code {rc})")
    return out


def main(argv=None) -> int:
    from converter.loaders import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the F32 GGUF and one GGUF per type")
    ap.add_argument("--types", default=",".join(TYPES), help="llama.cpp mixes (LLAMA_FTYPE_MOSTLY_*)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("cannot run: llama-cpp-python is not installed (optional: pip install llama-cpp-python)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = default_model_path()
    stem = source.stem.split(".")[0]                      # SmolLM2-135M-Instruct
    f32 = out / f"{stem}.F32.gguf"
    if not f32.exists():
        float_gguf(source, f32.with_suffix(".tmp"))
        f32.with_suffix(".tmp").rename(f32)
    for t in args.types.split(","):
        dst = out / f"{stem}.{t}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            quantize(f32, tmp, t, args.threads)
            tmp.rename(dst)
        print(f"{dst}  {dst.stat().st_size / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
