"""Tiny-QMoE converter: Llama-3.2-family checkpoints in, quantized LZW bundles out.

Walk-through for newcomers, in the order data flows:
  config.py      one frozen LlamaConfig, from config.json or GGUF metadata
  loaders.py     stream (name, float32 array) from safetensors folders or GGUF files
  quant/         one module per quantization scheme (quantize / dequantize pairs)
  lzw.py         the QZ chunk format, readable reference (docs/lzw-format.md)
  codec.py       the fast path: the same codec compiled to WASM, via wasmtime
  bundle.py      write and load bundles (manifest + blobs + tokenizer + ONNX graph)
  onnx_export.py the decoder graph with KV cache
  runtime/       pure-Python tokenizer, chat template and generation loop (also runs in Pyodide)
  cli.py         `python -m converter build | inspect | run | chat`
"""

__version__ = "0.1.0"
