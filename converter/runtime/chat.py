"""A chat model = tokenizer + chat template + generation loop over a session. Pure Python (also runs in Pyodide).

The page and the CLI both build a `ChatModel` from a bundle's tokenizer files and manifest config, and hand it a
session object (onnxruntime CPU here, onnxruntime-web there).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from .generate import GenerationResult, SamplingConfig, generate
from .tokenizer import Tokenizer


def _token_text(v) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class ChatModel:
    def __init__(self, tokenizer_json: dict | str | os.PathLike, tokenizer_config: dict, model_config: dict,
                 session, generation_config: dict | None = None):
        # tokenizer.json as a file (the page: its text released once parsed), as text, or already parsed
        self.tokenizer = (Tokenizer.from_file(tokenizer_json) if isinstance(tokenizer_json, os.PathLike)
                          else Tokenizer.from_json(tokenizer_json) if isinstance(tokenizer_json, (str, bytes))
                          else Tokenizer.from_json_dict(tokenizer_json))
        self.tokenizer_config = tokenizer_config or {}
        self.session = session
        self.template = self.tokenizer_config.get("chat_template")
        if isinstance(self.template, list):            # some configs carry a list of named templates
            named = {t.get("name"): t.get("template") for t in self.template if isinstance(t, dict)}
            self.template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_text(self.tokenizer_config.get("bos_token")) or ""
        self.eos_token = _token_text(self.tokenizer_config.get("eos_token")) or ""
        eos = list(model_config.get("eos_token_ids") or [])
        gen_eos = (generation_config or {}).get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if isinstance(gen_eos, int) else [])
        tid = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        if tid is not None:
            eos.append(tid)
        self.eos_ids = tuple(dict.fromkeys(eos))
        self.context = int(model_config.get("max_position_embeddings") or 0)   # positions: prompt + reply

    @property
    def has_template(self) -> bool:
        return bool(self.template)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        from .chat_template import render_chat
        return render_chat(self.template, list(messages), add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)

    def prompt_ids(self, messages: Sequence[dict] | None = None, raw: str | None = None) -> list[int]:
        """Token ids of a chat (rendered with the model's template) or of raw text as is."""
        if raw is not None:
            return self.tokenizer.encode(raw, add_special_tokens=True)
        if not self.has_template:
            text = "\n".join(m["content"] for m in messages)
            return self.tokenizer.encode(text, add_special_tokens=True)
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False)

    def fit_messages(self, messages: Sequence[dict], reserve: int) -> tuple[list[dict], int]:
        """(messages, how many were dropped): see fit_prompt."""
        return self.fit_prompt(messages, reserve)[:2]

    def fit_prompt(self, messages: Sequence[dict], reserve: int) -> tuple[list[dict], int, list[int]]:
        """(messages, how many were dropped, their prompt ids): the oldest turns after any system message are left
        out until the prompt leaves `reserve` positions of the context for the reply. The last message always stays
        (if it alone is too long, Generation says so). The conversation is tokenized once per try, the kept one's ids
        returned, so a turn is not tokenized twice."""
        msgs = list(messages)
        keep = 1 if msgs and msgs[0].get("role") == "system" else 0
        dropped = 0
        ids = self.prompt_ids(msgs)
        while self.context and len(msgs) - keep > 1 and len(ids) + reserve > self.context:
            del msgs[keep]
            dropped += 1
            if len(msgs) - keep > 1 and msgs[keep].get("role") == "assistant":   # a reply without its question
                del msgs[keep]
                dropped += 1
            ids = self.prompt_ids(msgs)
        return msgs, dropped, ids

    def generate(self, prompt_ids: list[int], sampling: SamplingConfig,
                 on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, reuse: bool = True) -> GenerationResult:
        """reuse: run only the part of the prompt after what the session's KV cache already holds (a chat's earlier
        turns)."""
        return generate(self.session, self.tokenizer, prompt_ids, self.eos_ids, sampling, on_text, should_stop,
                        context=self.context, reuse=reuse)
