"""Rebuild a Hugging Face tokenizer.json (+ tokenizer_config.json) from the `tokenizer.ggml.*` metadata of a GGUF.

llama.cpp's converter stores the vocabulary as three parallel arrays (tokens, token_type, merges) plus a name for
the pre-tokenizer (`tokenizer.ggml.pre`); the regexes themselves are not stored, so they come from the table
below. Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported; SentencePiece ("llama")
vocabularies are refused. The result loads in `tokenizers.Tokenizer.from_str` and in `runtime.tokenizer`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import FormatError
from .runtime.tokenizer import LLAMA3_PATTERN

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_BYTE_LEVEL_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_PLAIN = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

# tokenizer.ggml.pre -> (pre_tokenizer, model.ignore_merges), as Hugging Face's own tokenizer.json sets them.
PRE_TOKENIZERS: dict[str, tuple[dict, bool]] = {
    "gpt2": (_BYTE_LEVEL_REGEX, False),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      _BYTE_LEVEL_REGEX]}, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        _BYTE_LEVEL_PLAIN]}, True),
}


def tokenizer_json_from_gguf(path_or_reader) -> tuple[dict, dict]:
    """(tokenizer.json dict, tokenizer_config.json dict) from a GGUF path or an open `gguf.GGUFReader`."""
    reader, source = _open(path_or_reader)
    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # the gguf package raises assorted numpy errors on damaged fields
            raise FormatError(f"{source}: GGUF metadata {key} cannot be read ({type(e).__name__}: {e})") from None

    def need(key: str) -> Any:
        v = get(key)
        if v is None:
            raise FormatError(f"{source}: GGUF metadata key {key} is missing")
        return v

    model = need("tokenizer.ggml.model")
    if model == "llama":
        raise FormatError(f"{source}: SentencePiece vocabularies (tokenizer.ggml.model = 'llama') are not "
                          "supported; only byte-level BPE ('gpt2')")
    if model != "gpt2":
        raise FormatError(f"{source}: tokenizer.ggml.model = {model!r} is not supported; only byte-level BPE "
                          "('gpt2')")
    pre = get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise FormatError(f"{source}: tokenizer.ggml.pre = {pre!r} is not supported; known: "
                          f"{', '.join(sorted(PRE_TOKENIZERS))}")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]

    tokens = [str(t) for t in need("tokenizer.ggml.tokens")]
    types = [int(t) for t in get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
    merges = [str(m) for m in need("tokenizer.ggml.merges")]
    if len(types) != len(tokens):
        raise FormatError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries, tokens has {len(tokens)}")
    for i, m in enumerate(merges):
        if len(m.split(" ")) != 2:
            raise FormatError(f"{source}: tokenizer.ggml.merges[{i}] = {m!r} is not 'left right'")

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise FormatError(f"{source}: token {t!r} appears twice (ids {vocab[t]} and {i})")
        vocab[t] = i

    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] == TOKEN_USER_DEFINED, "special": types[i] != TOKEN_USER_DEFINED}
             for i, t in enumerate(tokens) if types[i] in (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED)]

    def token_at(key: str) -> str | None:
        i = get(key)
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise FormatError(f"{source}: {key} = {i} is outside the vocabulary (0..{len(tokens) - 1})")
        return tokens[int(i)]

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(get("tokenizer.ggml.add_eos_token", False))

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(source, bos if add_bos else None, eos if add_eos else None, vocab),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "chat_template": get("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
    }
    return tokenizer, config


def _post_processor(source: str, bos: str | None, eos: str | None, vocab: dict[str, int]) -> dict:
    """ByteLevel (offsets only) when nothing is added, else a TemplateProcessing that adds BOS and/or EOS."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if bos is None and eos is None:
        return byte_level
    specials = {tok: {"id": tok, "ids": [vocab[tok]], "tokens": [tok]} for tok in (bos, eos) if tok is not None}
    single: list[dict] = []
    if bos is not None:
        single.append({"SpecialToken": {"id": bos, "type_id": 0}})
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if eos is not None:
        single.append({"SpecialToken": {"id": eos, "type_id": 0}})
    pair = single + [{"SpecialToken": {"id": bos, "type_id": 1}}] * (bos is not None) \
        + [{"Sequence": {"id": "B", "type_id": 1}}] + [{"SpecialToken": {"id": eos, "type_id": 1}}] * (eos is not None)
    return {"type": "Sequence", "processors": [
        byte_level, {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}]}


def _open(path_or_reader) -> tuple[Any, str]:
    if isinstance(path_or_reader, (str, Path)):
        import gguf
        path = Path(path_or_reader)
        try:
            return gguf.GGUFReader(str(path), "r"), str(path)
        except Exception as e:  # gguf raises bare numpy/struct errors on damaged files; name the file at least
            raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if not hasattr(path_or_reader, "fields"):
        raise FormatError(f"expected a GGUF path or gguf.GGUFReader, got {type(path_or_reader).__name__}")
    return path_or_reader, str(getattr(path_or_reader, "path", "<gguf>"))
