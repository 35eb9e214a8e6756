"""Typed errors. Each names the file, tensor or byte offset it is about, so a user never sees a deep traceback."""
from __future__ import annotations


class TinyQMoEError(Exception):
    """Base of every error this project raises on purpose (the CLI turns them into exit code 2)."""


class FormatError(TinyQMoEError):
    """An input checkpoint (config.json, safetensors, GGUF, tokenizer) is malformed or unsupported."""


class QuantError(TinyQMoEError):
    """A tensor cannot be quantized with the requested scheme (shape, NaN/Inf, unknown scheme)."""


class BundleError(TinyQMoEError):
    """A bundle on disk is malformed: names the file and the field or byte offset."""


class CodecError(TinyQMoEError):
    """A QZ chunk failed to decode; `code` is the error code of docs/lzw-format.md."""

    NAMES = {1: "BAD_HEADER", 2: "TRUNCATED", 3: "BAD_CODE", 4: "OVERRUN", 5: "TRAILING",
             6: "OUT_TOO_SMALL", 7: "BAD_SYMBOL"}

    def __init__(self, code: int, message: str = ""):
        self.code = int(code)
        self.name = self.NAMES.get(self.code, f"ERROR_{self.code}")
        super().__init__(f"{self.name}: {message}" if message else self.name)
