"""Quality of quantized bundles against their float baseline, on onnxruntime CPU (`python -m converter eval`).

  data.py     fixed KL texts, the perplexity corpus, MMLU / ARC parsers, prompts          (no model)
  scoring.py  KL, perplexity, multiple-choice log-likelihoods over an OrtDecoder, Wilson intervals
  runner.py   EvalOptions and evaluate(): baseline first, one session at a time
  report.py   table, report.json, report.md, PNG plots
"""
from .data import EvalError, Question, load_arc, load_mmlu, mc_prompt, subset
from .report import data_lines, require_matplotlib, table_rows, write_report
from .runner import TASKS, EvalOptions, evaluate, parse_tasks
from .scoring import continuation_logprobs, encode_mc, score_mc, wilson_interval

__all__ = ["EvalError", "EvalOptions", "Question", "TASKS", "continuation_logprobs", "data_lines", "encode_mc",
           "evaluate", "load_arc", "load_mmlu", "mc_prompt", "parse_tasks", "require_matplotlib", "score_mc",
           "subset", "table_rows", "wilson_interval", "write_report"]
