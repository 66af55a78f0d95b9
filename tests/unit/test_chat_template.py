"""Hugging Face tokenizer folders (tokenizer.json + a chat template) against transformers' ``apply_chat_template``.

The folders are made here: transformers converts the bundled Mixtral-8x7B sentencepiece model into a
``tokenizer.json`` (offline), and each folder gets a ``tokenizer_config.json`` with a small Mistral-like jinja
template. transformers' own tokenizer loaded from the same folder is the reference, for the prompt text and ids.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.errors import ChatFormatError, SetupError
from cluster.text.chat_template import ChatTemplate
from cluster.text.detokenizer import IncrementalDetokenizer
from cluster.text.tokenizer import Tokenizer
from tests.tokenizer_refs import DATA

# Mistral-like: system prompt folded into the first user turn, tools before the last user turn, tool calls and
# results, alternation enforced with raise_exception, a namespace, loop controls and transformers' generation tag.
MISTRAL_LIKE = """
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(users=0) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
{%- endfor %}
{{- bos_token }}
{%- set seen = namespace(users=0) %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- set seen.users = seen.users + 1 %}
        {%- if tools and seen.users == ns.users %}
            {{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined %}
        {{- '[TOOL_CALLS] ' + (message['tool_calls'] | map(attribute='function') | list | tojson) + eos_token }}
    {%- elif message['role'] == 'assistant' %}
        {%- if loop.first %}
            {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}
        {%- endif %}
        {% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS] ' + ({'call_id': message['tool_call_id'], 'content': message['content']} | tojson) }}
        {{- '[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user, assistant and tool roles are supported, got ' + message['role']) }}
    {%- endif %}
    {%- if loop.index > 1000 %}{% break %}{% endif %}
{%- endfor %}
"""
NO_TOOLS = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CONTENT_LOOP = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}<{{ part['text'] }}>{% endfor %}{% endif %}{% endfor %}"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json of Mixtral-8x7B's sentencepiece model, converted by transformers (offline)."""
    source = tmp_path_factory.mktemp("spm")
    shutil.copy(DATA / "tokenizer.model.v1", source / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    out = tmp_path_factory.mktemp("converted")
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out / "tokenizer.json"


def hf_folder(folder: Path, tokenizer_json: Path, template: Any = None, *, jinja_file: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    config: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}
    config |= {"unk_token": {"__type": "AddedToken", "content": "<unk>", "special": True}, "legacy": False}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (folder / "chat_template.jinja").write_text(jinja_file)
    return folder


@pytest.fixture(scope="module")
def mistral_like(
    tmp_path_factory: pytest.TempPathFactory, converted: Path
) -> tuple[Tokenizer, PreTrainedTokenizerBase]:
    folder = hf_folder(tmp_path_factory.mktemp("mistral_like"), converted, MISTRAL_LIKE)
    return Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


def hf_ids(ref: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any) -> list[int]:
    ids = ref.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)  # type: ignore[arg-type]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "single_user": ([{"role": "user", "content": "Hello"}], None),
    "system_multi_turn": (
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "中文 😀 and 🦜\n\nok"},
        ],
        None,
    ),
    "tools_call_result": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "snow"},
            {"role": "assistant", "content": "It snows."},
            {"role": "user", "content": "Thanks"},
        ],
        [WEATHER],
    ),
    # transformers' default tokenizes special tokens written in the rendered text, user text included
    "special_token_in_text": ([{"role": "user", "content": "say <s> and </s>"}], None),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_matches_apply_chat_template(mistral_like: tuple, name: str) -> None:
    tok, ref = mistral_like
    messages, tools = CONVERSATIONS[name]
    assert tok.kind == "huggingface" and tok.version is None
    assert tok.encode_chat(messages, tools=tools) == hf_ids(ref, messages, tools)
    backend_template = ChatTemplate(MISTRAL_LIKE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    text = ref.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert backend_template.render(messages, tools=tools) == text


def test_template_errors(mistral_like: tuple) -> None:
    tok, _ = mistral_like
    with pytest.raises(ChatFormatError, match="roles must alternate") as err:
        tok.encode_chat([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
    assert err.value.param == "messages"
    with pytest.raises(ChatFormatError, match="got narrator") as err:
        tok.encode_chat([{"role": "narrator", "content": "x"}])
    assert err.value.param == "messages"
    with pytest.raises(ChatFormatError, match="message 0: content must be a string, got list .*'image_url'"):
        tok.encode_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}])
    with pytest.raises(ChatFormatError, match="tools must be a list") as err:
        tok.encode_chat([{"role": "user", "content": "x"}], tools="get_weather")  # type: ignore[arg-type]
    assert err.value.param == "tools"
    for bad, match in [([], "messages is empty"), ("hi", "must be a list"), (["hi"], "message 0: expected a mapping")]:
        with pytest.raises(ChatFormatError, match=match):
            tok.encode_chat(bad)  # type: ignore[arg-type]


def test_text_parts_joined_unless_the_template_loops_over_content(
    tmp_path: Path, converted: Path, mistral_like: tuple
) -> None:
    tok, ref = mistral_like
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert tok.encode_chat(parts) == hf_ids(ref, [{"role": "user", "content": "one\n\ntwo"}], None)
    # A template that iterates over the content gets the parts as they are (here from chat_template.jinja, which
    # wins over tokenizer_config.json for transformers too).
    folder = hf_folder(tmp_path / "loop", converted, NO_TOOLS, jinja_file=CONTENT_LOOP)
    looping, looping_ref = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert looping.encode_chat(parts) == hf_ids(looping_ref, parts, None)
    assert looping.decode(looping.encode_chat(parts)) == "[user]<one><two>"


def test_named_templates_and_tools_support(tmp_path: Path, converted: Path) -> None:
    named = [{"name": "default", "template": NO_TOOLS}, {"name": "tool_use", "template": MISTRAL_LIKE}]
    folder = hf_folder(tmp_path / "named", converted, named)
    tok, ref = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    messages, tools = CONVERSATIONS["tools_call_result"]
    assert tok.encode_chat(messages, tools=tools) == hf_ids(ref, messages, tools)  # the tool_use template
    plain = CONVERSATIONS["system_multi_turn"][0]
    assert tok.encode_chat(plain) == hf_ids(ref, plain, None)  # the default template
    no_tools = Tokenizer.from_dir(hf_folder(tmp_path / "no_tools", converted, NO_TOOLS))
    with pytest.raises(ChatFormatError, match="does not support tools") as err:
        no_tools.encode_chat(plain, tools=tools)
    assert err.value.param == "tools"
    without = Tokenizer.from_dir(hf_folder(tmp_path / "none", converted))
    with pytest.raises(ChatFormatError, match="has no chat template"):
        without.encode_chat(plain)
    with pytest.raises(SetupError, match="does not compile"):
        Tokenizer.from_dir(hf_folder(tmp_path / "broken", converted, "{% for m in messages %}"))


def test_finetune_template_wins_over_plain_tokenizer_model(tmp_path: Path, converted: Path) -> None:
    # A Mixtral fine-tune in ChatML: tokenizer.model + tokenizer.json + a template that is not Mistral's [INST].
    folder = hf_folder(tmp_path / "chatml", converted, CHATML)
    shutil.copy(DATA / "tokenizer.model.v1", folder / "tokenizer.model")
    tok, ref = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.path == folder / "tokenizer.json"
    messages = CONVERSATIONS["system_multi_turn"][0]
    assert tok.encode_chat(messages) == hf_ids(ref, messages, None)
    # With Mistral's own format the sentencepiece file and mistral-common stay in charge.
    mistral_folder = hf_folder(tmp_path / "mistral", converted, MISTRAL_LIKE)
    shutil.copy(DATA / "tokenizer.model.v1", mistral_folder / "tokenizer.model")
    assert Tokenizer.from_dir(mistral_folder).kind == "sentencepiece"


TEXTS = [
    "Hello world",
    "  two leading spaces",
    "中文字符，你好世界。",
    "rare 龘𠀋 🦜 bytes",
    "tabs\tand\r\nnewlines  ",
    "",
]


def test_text_matches_transformers(mistral_like: tuple) -> None:
    tok, ref = mistral_like
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == ref(text, add_special_tokens=False).input_ids
        assert tok.encode(text) == [ref.bos_token_id, *ids]
        assert tok.decode([1, *ids, 2]) == ref.decode([1, *ids, 2], skip_special_tokens=True)
        assert [tok.id_to_piece(i) for i in ids] == ref.convert_ids_to_tokens(ids)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    e4 = ref.convert_tokens_to_ids("<0xE4>")
    assert tok.byte_value(e4) == 0xE4 and tok.piece_bytes(e4) == b"\xe4" and tok.piece_bytes(1) == b""


def test_stream_equals_decode(mistral_like: tuple) -> None:
    tok, _ = mistral_like
    rng = random.Random(3)
    sequences = [tok.encode(text, bos=True, eos=True) for text in TEXTS]
    sequences += [
        [rng.randrange(32000) if rng.random() < 0.4 else rng.randrange(0, 300) for _ in range(25)] for _ in range(150)
    ]
    for ids in sequences:
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.add(i) for i in ids]
        for k in range(1, len(ids) + 1):
            assert tok.decode(ids[:k]).startswith("".join(deltas[:k])), ids
        assert "".join(deltas) + detok.flush() == tok.decode(ids), ids
