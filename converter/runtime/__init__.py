"""Generation runtime: tokenizer, chat template and generation loop. Pure Python (stdlib only), so the same files
run under CPython and under Pyodide in the page; nothing here may import numpy, regex or jinja2."""
