"""Byte-level BPE tokenizer read from a Hugging Face `tokenizer.json`, in pure Python (stdlib only).

Runs under CPython and Pyodide, so it cannot use the `regex` module: the two pre-tokenizer regexes that byte-level
Llama-family tokenizers use (GPT-2's and Llama-3's) are implemented as hand-written scanners over a per-character
class (letter / number / white space / other), taken from `unicodedata.category`. Any other pattern is refused.

Encoding follows the `tokenizers` library step by step:

    text ──► added tokens split out (exact strings; non-normalized first, then normalized)
         ──► each remaining segment: pre-tokenizer Sequence (Split / Digits / ByteLevel) ──► pieces
         ──► each piece: BPE (rank-ordered merges, one merge at a time, leftmost first) ──► ids
         ──► post-processor (TemplateProcessing adds e.g. BOS when add_special_tokens=True)

Decoding maps each token's characters back to bytes (ByteLevel decoder) and decodes UTF-8 with replacement;
`StreamDecoder` does the same incrementally and holds back bytes of an unfinished UTF-8 sequence.

Supported tokenizer.json subset (everything else raises TokenizerError naming the field):
    normalizer      null
    pre_tokenizer   Sequence of Split(Regex = GPT-2 or Llama-3 pattern, behavior Isolated, invert false),
                    Digits(individual_digits), ByteLevel(add_prefix_space, use_regex)
    model           BPE: vocab (ids < 2**21), merges ("a b" strings or [a, b] lists; both halves and their
                    concatenation in the vocab, as `tokenizers` requires), ignore_merges, unk_token, fuse_unk;
                    no dropout, byte_fallback, continuing_subword_prefix or end_of_word_suffix
    added_tokens    special and plain; lstrip, rstrip, single_word, normalized honoured
    post_processor  null, ByteLevel, TemplateProcessing, Sequence of these
    decoder         ByteLevel
"""
from __future__ import annotations

import codecs
import heapq
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable


class TokenizerError(ValueError):
    """tokenizer.json is malformed or uses a feature outside the supported subset."""


# ---------------------------------------------------------------------------------------------------------------
# Byte-level alphabet: every byte 0..255 maps to one printable character (GPT-2's table), so a byte string can
# be a BPE "word" of ordinary characters. Printable Latin-1 bytes map to themselves, the rest to U+0100 onwards.
# ---------------------------------------------------------------------------------------------------------------

def _byte_to_char_table() -> list[str]:
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _byte_to_char_table()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# str.translate tables: latin-1 text (one char per byte) -> byte-level chars, and back.
_TO_BYTE_LEVEL = {b: c for b, c in enumerate(BYTE_TO_CHAR)}
_FROM_BYTE_LEVEL = {ord(c): b for b, c in enumerate(BYTE_TO_CHAR)}


def bytes_to_byte_level(data: bytes) -> str:
    """b'Hi \\n' -> 'HiĠĊ'."""
    return data.decode("latin-1").translate(_TO_BYTE_LEVEL)


# ---------------------------------------------------------------------------------------------------------------
# Character classes for the pre-tokenizer scanners.
#   \p{L} = general category L*,  \p{N} = N*,  \s = Unicode White_Space (what Oniguruma's and the regex crate's
#   \s match). str.isspace() is NOT the same: it also accepts U+001C..U+001F, which \s does not.
# ---------------------------------------------------------------------------------------------------------------

_LETTER, _NUMBER, _SPACE, _OTHER = 1, 2, 3, 4          # non-zero so `cache.get(c) or ...` works

WHITE_SPACE = frozenset(
    [chr(c) for c in range(0x09, 0x0E)] + [" ", "\x85", "\xa0", "\u1680"]
    + [chr(c) for c in range(0x2000, 0x200B)] + ["\u2028", "\u2029", "\u202f", "\u205f", "\u3000"])

_CLASS_CACHE: dict[str, int] = {}


def _classify(c: str) -> int:
    if c in WHITE_SPACE:
        k = _SPACE
    else:
        major = unicodedata.category(c)[0]
        k = _LETTER if major == "L" else _NUMBER if major == "N" else _OTHER
    _CLASS_CACHE[c] = k
    return k


for _i in range(128):                             # ASCII pre-filled: the common case never calls unicodedata
    _classify(chr(_i))
del _i


def _classes(text: str) -> list[int]:
    get = _CLASS_CACHE.get
    return [get(c) or _classify(c) for c in text]


def _run_end(cls: list[int], start: int, kind: int) -> int:
    """First index >= start whose class is not `kind`."""
    n, j = len(cls), start
    while j < n and cls[j] == kind:
        j += 1
    return j


def _fold(c: str) -> str:
    """Simple (one-to-one) case folding, as (?i:...) applies it: 'S' and 'ſ' fold to 's'; 'ﬆ' (folds to two
    characters, 'st') stays itself and does not match 's'."""
    f = c.casefold()
    return f if len(f) == 1 else c


def _is_word_char(c: str) -> bool:
    """Unicode \\w as the regex crate defines it: letters, marks, Nd, Nl, connector punctuation (e.g. '_'),
    ZWNJ/ZWJ. Used by added tokens with single_word=true."""
    cat = unicodedata.category(c)
    return cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or c in "\u200c\u200d"


def _contraction_len(text: str, i: int, fold_case: bool) -> int:
    """Length of 's 't 're 've 'm 'll 'd at text[i] (text[i] == "'"), or 0."""
    two = text[i + 1:i + 3]
    if fold_case:
        two = "".join(_fold(c) for c in two)
    if two in ("re", "ve", "ll"):
        return 3
    if two[:1] in ("s", "t", "m", "d"):
        return 2
    return 0


def _whitespace_tail(cls: list[int], i: int) -> int:
    """End of `\\s+(?!\\S)|\\s+` at i: the white-space run, minus its last char when a non-space follows and the
    run has more than one char (that last space then prefixes the next word)."""
    j = _run_end(cls, i, _SPACE)
    if j < len(cls) and j - 1 > i:
        j -= 1
    return j


# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizer scanners: each returns the matches of its pattern in order; together they cover the whole text
# (every character is matched by some alternative), so Split(behavior=Isolated) is just this list.
# ---------------------------------------------------------------------------------------------------------------

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def split_gpt2(text: str) -> list[str]:
    """GPT2_PATTERN, alternative by alternative."""
    cls = _classes(text)
    n, i, out = len(text), 0, []
    while i < n:
        c, k = text[i], cls[i]
        if c == "'":                                               # 's|'t|'re|'ve|'m|'ll|'d
            m = _contraction_len(text, i, fold_case=False)
            if m:
                out.append(text[i:i + m])
                i += m
                continue
        start = i
        if c == " " and i + 1 < n and cls[i + 1] != _SPACE:       # the optional space of ` ?X+`
            i += 1
            k = cls[i]
        if k != _SPACE:                                            # ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
            j = _run_end(cls, i, k)
        else:                                                      # `\s+(?!\S)|\s+`
            j = _whitespace_tail(cls, i)
        out.append(text[start:j])
        i = j
    return out


def split_llama3(text: str) -> list[str]:
    """LLAMA3_PATTERN, alternative by alternative."""
    cls = _classes(text)
    n, i, out = len(text), 0, []
    while i < n:
        c, k = text[i], cls[i]
        if c == "'":                                               # (?i:'s|'t|'re|'ve|'m|'ll|'d)
            m = _contraction_len(text, i, fold_case=True)
            if m:
                out.append(text[i:i + m])
                i += m
                continue
        if k == _LETTER:                                           # \p{L}+
            j = _run_end(cls, i, _LETTER)
        elif k != _NUMBER and c not in "\r\n" and i + 1 < n and cls[i + 1] == _LETTER:
            j = _run_end(cls, i + 1, _LETTER)                      # [^\r\n\p{L}\p{N}]\p{L}+
        elif k == _NUMBER:                                         # \p{N}{1,3}
            j = min(_run_end(cls, i, _NUMBER), i + 3)
        elif k == _OTHER or (c == " " and i + 1 < n and cls[i + 1] == _OTHER):
            j = _run_end(cls, i + 1, _OTHER)                       # ` ?[^\s\p{L}\p{N}]+[\r\n]*`
            while j < n and text[j] in "\r\n":
                j += 1
        else:                                                      # white space
            run = _run_end(cls, i, _SPACE)
            last_nl = max(text.rfind("\r", i, run), text.rfind("\n", i, run))
            if last_nl >= 0:                                       # `\s*[\r\n]+` backtracks to the last newline
                j = last_nl + 1
            else:                                                  # `\s+(?!\S)|\s+`
                j = _whitespace_tail(cls, i)
        out.append(text[i:j])
        i = j
    return out


KNOWN_PATTERNS: dict[str, Callable[[str], list[str]]] = {GPT2_PATTERN: split_gpt2, LLAMA3_PATTERN: split_llama3}


# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenizer steps: each maps one piece of text to its sub-pieces (empty ones dropped).
# ---------------------------------------------------------------------------------------------------------------

class _SplitStep:
    def __init__(self, scanner: Callable[[str], list[str]]):
        self.scanner = scanner

    def __call__(self, piece: str) -> list[str]:
        return self.scanner(piece)


class _DigitsStep:
    """Digits: isolate numbers (\\p{N}), each digit alone when individual_digits."""

    def __init__(self, individual: bool):
        self.individual = individual

    def __call__(self, piece: str) -> list[str]:
        cls = _classes(piece)
        if _NUMBER not in cls:
            return [piece]
        out, i, n = [], 0, len(piece)
        while i < n:
            if cls[i] == _NUMBER:
                j = i + 1 if self.individual else _run_end(cls, i, _NUMBER)
            else:
                j = i + 1
                while j < n and cls[j] != _NUMBER:
                    j += 1
            out.append(piece[i:j])
            i = j
        return out


class _ByteLevelStep:
    """ByteLevel: optional leading space, optional GPT-2 split, then bytes -> byte-level characters."""

    def __init__(self, add_prefix_space: bool, use_regex: bool):
        self.add_prefix_space = add_prefix_space
        self.use_regex = use_regex

    def __call__(self, piece: str) -> list[str]:
        if self.add_prefix_space and not piece.startswith(" "):
            piece = " " + piece
        parts = split_gpt2(piece) if self.use_regex else [piece]
        return [bytes_to_byte_level(p.encode("utf-8")) for p in parts]


def _build_pre_tokenizer(spec: dict | None) -> list[Callable[[str], list[str]]]:
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        steps = []
        for sub in spec.get("pretokenizers", []):
            steps.extend(_build_pre_tokenizer(sub))
        return steps
    if kind == "ByteLevel":
        return [_ByteLevelStep(bool(spec.get("add_prefix_space", False)), bool(spec.get("use_regex", True)))]
    if kind == "Digits":
        return [_DigitsStep(bool(spec.get("individual_digits", False)))]
    if kind == "Split":
        pattern = spec.get("pattern", {})
        if "Regex" not in pattern:
            raise TokenizerError(f"pre_tokenizer Split: only Regex patterns are supported, got {pattern!r}")
        regex = pattern["Regex"]
        if regex not in KNOWN_PATTERNS:
            raise TokenizerError(f"pre_tokenizer Split: unsupported regex {regex!r}; this runtime has scanners "
                                 f"only for the GPT-2 and Llama-3 patterns")
        if spec.get("behavior") != "Isolated" or spec.get("invert", False):
            raise TokenizerError(f"pre_tokenizer Split: only behavior=Isolated, invert=false is supported, got "
                                 f"behavior={spec.get('behavior')!r}, invert={spec.get('invert')!r}")
        return [_SplitStep(KNOWN_PATTERNS[regex])]
    raise TokenizerError(f"pre_tokenizer type {kind!r} is not supported (expected Sequence, Split, Digits, "
                         f"ByteLevel)")


# ---------------------------------------------------------------------------------------------------------------
# Added tokens: exact strings matched before pre-tokenization (leftmost, longest at a position).
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool = False
    lstrip: bool = False        # the match swallows white space on its left
    rstrip: bool = False        # ... and on its right
    single_word: bool = False   # only match when not glued to a letter/digit on either side
    normalized: bool = True     # matched after normalization (second pass) rather than on the raw text


class _AddedMatcher:
    """Finds one group of added tokens (the non-normalized or the normalized ones) in a text segment."""

    def __init__(self, tokens: list[AddedToken]):
        self.by_content = {t.content: t for t in tokens}
        # Longest first: `re` alternation is leftmost-first, so this gives leftmost-longest (as aho-corasick does).
        alternatives = sorted(self.by_content, key=len, reverse=True)
        self.regex = re.compile("|".join(re.escape(a) for a in alternatives))

    def split(self, text: str) -> list[tuple[str, int | None]]:
        out: list[tuple[str, int | None]] = []
        done = 0                                 # end of the last emitted match
        for m in self.regex.finditer(text):
            tok = self.by_content[m.group()]
            start, stop = m.start(), m.end()
            if start < done:                     # swallowed by the previous token's rstrip
                continue
            if tok.single_word and ((start > 0 and _is_word_char(text[start - 1]))
                                    or (stop < len(text) and _is_word_char(text[stop]))):
                continue
            if tok.lstrip:
                while start > done and text[start - 1] in WHITE_SPACE:
                    start -= 1
            if tok.rstrip:
                while stop < len(text) and text[stop] in WHITE_SPACE:
                    stop += 1
            if done < start:
                out.append((text[done:start], None))
            out.append((text[start:stop], tok.id))
            done = stop
        if done < len(text):
            out.append((text[done:], None))
        return out


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------------------------

class Tokenizer:
    """encode / decode with the semantics of the `tokenizers` library for the supported subset (module doc)."""

    def __init__(self, vocab: dict[str, int], merges: dict[int, int], added_tokens: list[AddedToken],
                 pre_tokenizer: list[Callable[[str], list[str]]], template: list[int | None] | None,
                 ignore_merges: bool = False, unk_id: int | None = None, fuse_unk: bool = False):
        self.vocab = vocab
        self.merges = merges                      # merge_table(): pair of ids -> rank and merged id
        self.ignore_merges = ignore_merges
        self.unk_id = unk_id
        self.fuse_unk = fuse_unk
        self.pre_tokenizer = pre_tokenizer
        self.template = template                  # post-processor: ids, with None where the text goes
        self.added_tokens = added_tokens
        self.added_by_content = {t.content: t for t in added_tokens}
        self.added_by_id = {t.id: t for t in added_tokens}
        self.special_ids = frozenset(t.id for t in added_tokens if t.special)
        self._matchers = [_AddedMatcher(group) for group in
                          ([t for t in added_tokens if not t.normalized], [t for t in added_tokens if t.normalized])
                          if group]
        # A list, not a dict: one pointer per id (a dict of 128k entries costs ~10 MB in Pyodide's heap, which
        # never shrinks).
        size = 1 + max(max(vocab.values(), default=-1), max((t.id for t in added_tokens), default=-1))
        self._id_to_token: list[str | None] = [None] * size
        for t, i in vocab.items():
            self._id_to_token[i] = t
        for t in added_tokens:
            self._id_to_token[t.id] = t.content
        self._bpe_cache: dict[str, list[int]] = {}
        self._bytes_cache: dict[int, bytes] = {}

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """From a tokenizer.json file. The lightest way in: the file's text is released once parsed, before the
        tables are built (the page writes the text into Pyodide's file system for this: its heap keeps its peak,
        and the text held through the build took SmolLM2's from 31.5 to 33.1 MiB, docs/page-bench.md)."""
        with open(path, "rb") as f:
            try:
                d = json.load(f)
            except ValueError as e:
                raise TokenizerError(f"{path}: tokenizer.json is not valid JSON: {e}") from None
        return cls._from_parsed(d)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Tokenizer":
        """From tokenizer.json's text. Lighter than from_json_dict: the parsed merges are released while the
        merge table is built, so the peak stays near the parsed file (what counts in Pyodide's heap)."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise TokenizerError(f"tokenizer.json is not valid JSON: {e}") from None
        return cls._from_parsed(d)

    @classmethod
    def _from_parsed(cls, d) -> "Tokenizer":
        """From tokenizer.json just parsed, which nothing else holds: its merges are consumed."""
        if not isinstance(d, dict):
            raise TokenizerError("tokenizer.json must hold a JSON object")
        return cls._from_dict(d, consume=True)

    @classmethod
    def from_json_dict(cls, d: dict) -> "Tokenizer":
        """From tokenizer.json parsed into a dict, which is left as it was."""
        return cls._from_dict(d, consume=False)

    @classmethod
    def _from_dict(cls, d: dict, consume: bool) -> "Tokenizer":
        if d.get("normalizer") is not None:
            raise TokenizerError(f"normalizer {d['normalizer'].get('type')!r} is not supported (only null)")
        model = d.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise TokenizerError(f"model type {model.get('type')!r} is not supported (only BPE)")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise TokenizerError(f"model.{key}={model[key]!r} is not supported")
        if model.get("byte_fallback"):
            raise TokenizerError("model.byte_fallback=true is not supported (byte-level BPE needs no fallback)")
        if model.get("dropout"):
            raise TokenizerError(f"model.dropout={model['dropout']!r} is not supported at inference")
        decoder = d.get("decoder")
        if not decoder or decoder.get("type") != "ByteLevel":
            raise TokenizerError(f"decoder {decoder and decoder.get('type')!r} is not supported (only ByteLevel)")

        if isinstance(model.get("merges"), dict):          # the packed form a bundle stores
            vocab, merges = _packed_tables(model)
        else:
            vocab = model.get("vocab") or {}
            if not isinstance(vocab, dict):
                raise TokenizerError("model.vocab must map tokens to ids")
            vocab = vocab if consume else dict(vocab)
            if not all(type(i) is int and 0 <= i < _ID_LIMIT for i in vocab.values()):
                t, i = next((t, i) for t, i in vocab.items() if not (type(i) is int and 0 <= i < _ID_LIMIT))
                raise TokenizerError(f"model.vocab[{t!r}] = {i!r} is not an id in [0, {_ID_LIMIT})")
            merges = model.get("merges") or []
            if not isinstance(merges, list):
                raise TokenizerError("model.merges must be a list")
            merges = merge_table(vocab, merges, consume=consume)
        added = [AddedToken(id=_added_id(t), content=t["content"], special=bool(t.get("special", False)),
                            lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                            single_word=bool(t.get("single_word", False)),
                            normalized=bool(t.get("normalized", not t.get("special", False))))
                 for t in d.get("added_tokens") or []]
        unk = model.get("unk_token")
        unk_id = None
        if unk is not None:
            unk_id = vocab.get(unk)
            if unk_id is None:
                unk_id = next((t.id for t in added if t.content == unk), None)
        return cls(vocab, merges, added, _build_pre_tokenizer(d.get("pre_tokenizer")),
                   _build_template(d.get("post_processor"), vocab, added),
                   ignore_merges=bool(model.get("ignore_merges", False)), unk_id=unk_id,
                   fuse_unk=bool(model.get("fuse_unk", False)))

    # ---- vocabulary ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Rows an embedding table needs: 1 + the largest id (model vocab and added tokens)."""
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int | None:
        t = self.added_by_content.get(token)
        return t.id if t is not None else self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._id_to_token[token_id] if 0 <= token_id < len(self._id_to_token) else None

    # ---- encoding -----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for segment, added_id in self._split_added(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for piece in self._pre_tokenize(segment):
                ids.extend(self._bpe(piece))
        if add_special_tokens and self.template is not None:
            ids = [x for slot in self.template for x in (ids if slot is None else (slot,))]
        return ids

    def _split_added(self, text: str) -> list[tuple[str, int | None]]:
        segments: list[tuple[str, int | None]] = [(text, None)]
        for matcher in self._matchers:
            segments = [part for seg, tid in segments
                        for part in ([(seg, tid)] if tid is not None else matcher.split(seg))]
        return segments

    def _pre_tokenize(self, segment: str) -> list[str]:
        pieces = [segment] if segment else []
        for step in self.pre_tokenizer:
            pieces = [sub for p in pieces for sub in step(p) if sub]
        return pieces

    def _bpe(self, word: str) -> list[int]:
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        if self.ignore_merges and word in self.vocab:
            ids = [self.vocab[word]]
        else:
            ids = self._symbols_to_ids(_merge_word(word, self.vocab, self.merges))
        if len(self._bpe_cache) < 100_000:        # bound memory on adversarial input
            self._bpe_cache[word] = ids
        return ids

    def _symbols_to_ids(self, symbols: list[int | None]) -> list[int]:
        ids: list[int] = []
        prev_unk = False
        for i in symbols:
            if i is not None:
                ids.append(i)
                prev_unk = False
            elif self.unk_id is not None:         # unknown symbols become unk (fused if asked); without unk, dropped
                if not (self.fuse_unk and prev_unk):
                    ids.append(self.unk_id)
                prev_unk = True
        return ids

    # ---- decoding -----------------------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (b'' for an unknown id). Tokens made only of byte-level characters map
        back byte by byte; others (e.g. added tokens with plain spaces) are taken as their UTF-8."""
        b = self._bytes_cache.get(token_id)
        if b is None:
            tok = self.id_to_token(token_id)
            if tok is None:
                b = b""
            elif all(c in CHAR_TO_BYTE for c in tok):
                b = tok.translate(_FROM_BYTE_LEVEL).encode("latin-1")
            else:
                b = tok.encode("utf-8")
            self._bytes_cache[token_id] = b
        return b

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        skip = self.special_ids if skip_special_tokens else frozenset()
        data = b"".join(self.token_bytes(i) for i in ids if i not in skip)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Decode token by token: `push(id)` returns the newly completed text ('' while a UTF-8 sequence is still
    unfinished, e.g. an emoji split over several byte tokens); `flush()` returns what is left (replacement
    characters for an unfinished tail). The concatenated output equals `Tokenizer.decode` of all ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# ---------------------------------------------------------------------------------------------------------------
# Helpers: merges, BPE, post-processor.
# ---------------------------------------------------------------------------------------------------------------

def _parse_merge(m, index: int) -> tuple[str, str]:
    if isinstance(m, str):
        parts = m.split(" ")
    elif isinstance(m, (list, tuple)):
        parts = list(m)
    else:
        parts = []
    if len(parts) != 2:
        raise TokenizerError(f"model.merges[{index}] = {m!r} is not a pair")
    return parts[0], parts[1]


# Merges are keyed by the pair of ids, packed in one int, and map to the merge's rank and the merged token's id,
# packed the same way: ints instead of tuples of strings keep the table at a third of the memory. A value orders
# merges by rank (smaller first) and its low 21 bits are the merged id. Where the merged ids grow with the rank (a
# trained vocabulary numbers its tokens in merge order: SmolLM2's merge r makes token 252 + r), the value is the
# merged id alone — the vocabulary's own int object, so the table holds no value objects of its own (~1.2 MB less
# in Pyodide's heap for SmolLM2's 48,900 merges).
_ID_BITS = 21
_ID_LIMIT = 1 << _ID_BITS                        # ids must fit in 21 bits (Llama 3: 128,256 tokens)
_ID_MASK = _ID_LIMIT - 1


def _added_id(t: dict) -> int:
    i = t.get("id") if isinstance(t, dict) else None
    if type(i) is not int or not 0 <= i < _ID_LIMIT:
        raise TokenizerError(f"added token {t!r}: id is not an int in [0, {_ID_LIMIT})")
    return i


def merge_table(vocab: dict[str, int], merges: list, consume: bool = False) -> dict[int, int]:
    """{id_a << 21 | id_b: rank << 21 | id of a+b} (or the id of a+b alone: _ids_as_ranks), rank = index in
    `merges`; a later duplicate of a pair wins, as in the Rust HashMap `tokenizers` builds from the list. As there,
    both halves and their concatenation must be in the vocabulary. consume=True empties `merges` while building
    (the strings are freed as they are read)."""
    table: dict[int, int] = {}
    get = vocab.get
    for r in range(len(merges) - 1, -1, -1):     # from the end, so the first pair kept is the last duplicate
        m = merges.pop() if consume else merges[r]
        if type(m) is str and m.count(" ") == 1:
            a, _, b = m.partition(" ")
        else:
            a, b = _parse_merge(m, r)
        ia, ib, inew = get(a), get(b), get(a + b)
        if ia is None or ib is None or inew is None:
            missing = a if ia is None else b if ib is None else a + b
            raise TokenizerError(f"model.merges[{r}] = {m!r}: {missing!r} is not in model.vocab")
        key = ia << _ID_BITS | ib
        if key not in table:
            table[key] = r << _ID_BITS | inew
    return _ids_as_ranks(table, vocab)


def _ids_as_ranks(table: dict[int, int], vocab: dict[str, int]) -> dict[int, int]:
    """The table with each value replaced by its merged id (the vocabulary's int object) when the merged ids,
    taken in rank order, strictly grow: then they order the merges as the ranks do. Otherwise unchanged."""
    ranked = sorted(table.values())
    if any((a ^ b) & _ID_MASK == 0 or (a & _ID_MASK) > (b & _ID_MASK) for a, b in zip(ranked, ranked[1:])):
        return table
    del ranked
    obj = {i: i for i in vocab.values()}               # id -> the vocabulary's own object for it
    for key, v in table.items():
        table[key] = obj[v & _ID_MASK]
    return table


# ---- packed form: how a bundle stores tokenizer.json ----------------------------------------------------------
# A BPE vocabulary is mostly redundant with its merges: every merge "a b" names a+b, a token of the vocabulary.
# The packed model keeps the tokens once, as a list in id order, and each merge as the id of the token it makes
# (delta-coded: SmolLM2's merge r makes token 252 + r, so the deltas are all 1) and the length of its left half.
# SmolLM2's tokenizer.json: 1,515,262 bytes, 584 KB as QZ chunks; packed about 220 KB. `unpack_model` restores
# the exact dict (merges as "a b" strings or [a, b] lists, as they came).

PACKED_MERGES = "merged-split-v1"


def pack_model(model: dict) -> dict | None:
    """The packed copy of a tokenizer.json "model" object, or None when it cannot be packed losslessly (ids not
    0..n-1, a merge whose halves are not a split of a token, a merge string with more than one space)."""
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not merges:
        return None
    tokens: list[str | None] = [None] * len(vocab)
    for t, i in vocab.items():
        if type(i) is not int or not 0 <= i < len(tokens) or tokens[i] is not None:
            return None
        tokens[i] = t
    pairs = isinstance(merges[0], list)
    deltas, splits, prev = [], [], 0
    for m in merges:
        if pairs:
            if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)):
                return None
            a, b = m
        else:
            if not isinstance(m, str) or m.count(" ") != 1:
                return None
            a, _, b = m.partition(" ")
        i = vocab.get(a + b)
        if i is None or not a or not b:
            return None
        deltas.append(i - prev)
        splits.append(len(a))
        prev = i
    packed = dict(model)
    packed["vocab"] = tokens
    packed["merges"] = {"packed": PACKED_MERGES, "pairs": pairs, "merged_delta": deltas, "split": splits}
    return packed


def _packed_merges(model: dict):
    """Validate a packed model; yields (rank, merged id, split) for each merge."""
    merges = model["merges"]
    if merges.get("packed") != PACKED_MERGES:
        raise TokenizerError(f"model.merges: unknown packed form {merges.get('packed')!r}")
    tokens, deltas, splits = model.get("vocab"), merges.get("merged_delta"), merges.get("split")
    if not (isinstance(tokens, list) and all(type(t) is str for t in tokens) and len(tokens) <= _ID_LIMIT
            and isinstance(deltas, list) and isinstance(splits, list) and len(deltas) == len(splits)):
        raise TokenizerError("model: packed vocab/merges must be a token list and two equal-length int lists")
    i = 0
    for r, (d, p) in enumerate(zip(deltas, splits)):
        i += d if type(d) is int else len(tokens)        # a non-int delta lands out of range below
        if not (0 <= i < len(tokens) and type(p) is int and 0 < p < len(tokens[i])):
            raise TokenizerError(f"model.merges[{r}]: packed merge (token {i}, split {p!r}) is out of range")
        yield r, i, p


def _packed_vocab(tokens: list) -> dict[str, int]:
    vocab = {t: k for k, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("model.vocab: the packed token list repeats a token")
    return vocab


def _packed_tables(model: dict) -> tuple[dict[str, int], dict[int, int]]:
    """vocab and merge_table() straight from the packed form, without making the merge strings (the page's
    Pyodide heap keeps its peak)."""
    tokens = model["vocab"]
    vocab = _packed_vocab(tokens)
    table: dict[int, int] = {}
    get = vocab.get
    ids_as_ranks, prev = True, -1         # the merged ids grow with the rank so far: store them alone
    for r, i, p in _packed_merges(model):                # forward, so a later duplicate of a pair overwrites
        t = tokens[i]
        ia, ib = get(t[:p]), get(t[p:])
        if ia is None or ib is None:
            raise TokenizerError(f"model.merges[{r}]: {t[:p]!r} + {t[p:]!r} is not a pair of tokens")
        if ids_as_ranks and i <= prev:                   # they do not: the ranks stored so far are put back
            ids_as_ranks = False
            rank = {j: q for q, j, _ in _packed_merges(model) if q < r}   # ids grew so far: one rank each
            for key, v in table.items():
                table[key] = rank[v] << _ID_BITS | v
            del rank
        prev = i
        table[ia << _ID_BITS | ib] = get(t) if ids_as_ranks else r << _ID_BITS | i
    return vocab, table


def unpack_model(model: dict) -> dict:
    """tokenizer.json's "model" object from its packed form (returned unchanged when it is not packed)."""
    merges = model.get("merges")
    if not isinstance(merges, dict):
        return model
    pairs = bool(merges.get("pairs"))
    tokens = model["vocab"]
    out = []
    for _, i, p in _packed_merges(model):
        t = tokens[i]
        out.append([t[:p], t[p:]] if pairs else t[:p] + " " + t[p:])
    unpacked = dict(model)
    unpacked["vocab"] = _packed_vocab(tokens)
    unpacked["merges"] = out
    return unpacked


def pack(d: dict) -> dict | None:
    """tokenizer.json with its model packed (pack_model), or None when it does not pack."""
    model = pack_model(d.get("model") or {})
    if model is None:
        return None
    packed = dict(d)
    packed["model"] = model
    return packed if unpack(packed) == d else None


def unpack(d: dict) -> dict:
    """tokenizer.json from a packed one (unchanged when it is not packed)."""
    model = d.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("merges"), dict):
        return d
    out = dict(d)
    out["model"] = unpack_model(model)
    return out


def _merge_word(word: str, vocab: dict[str, int], merges: dict[int, int]) -> list[int | None]:
    """BPE on one piece: repeatedly merge the adjacent pair of lowest rank (leftmost on ties), one merge at a time.
    Returns the ids of the final symbols (None for a character outside the vocabulary: it never merges).

    Symbols live in a doubly linked list over the character positions; a heap holds (rank, left position)
    candidates, checked against the current neighbours when popped (stale entries are skipped). O(n log n).
    A merge's table value orders it by rank (module note above merge_table), so the heap holds the values."""
    sym: list[int | None] = [vocab.get(c) for c in word]
    n = len(sym)
    if n <= 1:
        return sym
    nxt = list(range(1, n + 1))                  # nxt[i] == n: end of word
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        a, b = sym[i], sym[i + 1]
        v = None if a is None or b is None else merges.get(a << _ID_BITS | b)
        if v is not None:
            heap.append((v, i))
    heapq.heapify(heap)
    while heap:
        r, i = heapq.heappop(heap)                # r: the table value of the merge pushed
        j = nxt[i]
        a = sym[i]
        if a is None or a < 0 or j >= n:
            continue                              # stale: merged into its left neighbour since
        b = sym[j]
        v = None if b is None else merges.get(a << _ID_BITS | b)
        if v != r:
            continue                              # stale: one side has been merged since this was pushed
        sym[i] = a = v & _ID_MASK
        sym[j] = -1                               # merged away (None is taken: an unknown character)
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        p = prv[i]
        if p >= 0 and sym[p] is not None:
            vp = merges.get(sym[p] << _ID_BITS | a)
            if vp is not None:
                heapq.heappush(heap, (vp, p))
        k = nxt[i]
        if k < n and sym[k] is not None:
            vn = merges.get(a << _ID_BITS | sym[k])
            if vn is not None:
                heapq.heappush(heap, (vn, i))
    return [s for s in sym if s is None or s >= 0]


def _build_template(spec: dict | None, vocab: dict[str, int], added: list[AddedToken]) -> list[int | None] | None:
    """The single-sequence template as ids, None marking where the encoded text goes; None if nothing is added."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "ByteLevel":                       # only adjusts offsets: no ids
        return None
    if kind == "Sequence":
        template = None
        for sub in spec.get("processors", []):
            t = _build_template(sub, vocab, added)
            if t is not None:
                if template is not None:
                    raise TokenizerError("post_processor: more than one TemplateProcessing in a Sequence")
                template = t
        return template
    if kind == "TemplateProcessing":
        specials = spec.get("special_tokens", {})
        template: list[int | None] = []
        for item in spec.get("single", []):
            if "Sequence" in item:
                if item["Sequence"].get("id") != "A":
                    raise TokenizerError(f"post_processor: single template refers to {item['Sequence']!r}")
                template.append(None)
            elif "SpecialToken" in item:
                name = item["SpecialToken"]["id"]
                if name not in specials:
                    raise TokenizerError(f"post_processor: special token {name!r} missing from special_tokens")
                template.extend(int(i) for i in specials[name]["ids"])
            else:
                raise TokenizerError(f"post_processor: unknown template item {item!r}")
        if None not in template:
            raise TokenizerError("post_processor: single template has no $A sequence")
        return template
    raise TokenizerError(f"post_processor type {kind!r} is not supported (expected ByteLevel, TemplateProcessing, "
                         f"Sequence)")
