"""vLLM's chat template options and special-token decoding in the text layer, against independent references:
transformers' ``apply_chat_template`` (add_generation_prompt, continue_final_message, documents, extra template
variables) on a Hugging Face folder, mistral-common's ``AssistantMessage(prefix=True)`` for continue_final_message
on Mistral formats, sentencepiece itself for ``skip_special_tokens=False`` (vLLM's rule: special tokens' pieces, the
runs between them decoded alone, joined by a space unless ``spaces_between_special_tokens`` is false), and OpenAI's
byte-fallback reporting (``<0x0A>`` is "\\n" with bytes [10])."""

from __future__ import annotations

import json
import random
import shutil
from typing import Any

import pytest
import sentencepiece as spm
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from transformers import AutoTokenizer

from cluster.errors import ChatFormatError
from cluster.text.chat_template import ChatOptions
from cluster.text.detokenizer import IncrementalDetokenizer
from cluster.text.tokenizer import Tokenizer
from tests.tokenizer_refs import DATA, FILES, mixserve, reference

# Reads documents and an extra variable, and has a generation prompt: every option changes the text.
RAG = (
    "{{ bos_token }}{% if documents %}{% for d in documents %}<doc {{ d['title'] }}>{{ d['text'] }}</doc>"
    "{% endfor %}{% endif %}{% if persona is defined %}(as {{ persona }}){% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT = [{"role": "user", "content": "Summarise the documents."}]
OPEN = [*CHAT, {"role": "assistant", "content": "The documents say"}]
DOCS = [{"title": "a", "text": "Cats sleep."}, {"title": "b", "text": "Dogs bark."}]


@pytest.fixture(scope="module")
def rag(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    """A Hugging Face folder (Mixtral's vocabulary converted by transformers) with the RAG template; transformers'
    own tokenizer of the same folder is the reference."""
    source = tmp_path_factory.mktemp("spm")
    shutil.copy(DATA / FILES["v1"], source / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    folder = tmp_path_factory.mktemp("rag")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": RAG}))
    for extra in ("tokenizer.model", "chat_template.jinja"):
        (folder / extra).unlink(missing_ok=True)  # the tokenizer.json and this config's template only
    return Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize(
    ("messages", "kwargs"),
    [
        (CHAT, {}),
        (CHAT, {"add_generation_prompt": False}),
        (CHAT, {"documents": DOCS}),
        (CHAT, {"persona": "a pirate"}),
        (OPEN, {"add_generation_prompt": False, "continue_final_message": True}),
        (OPEN, {"add_generation_prompt": False, "continue_final_message": True, "documents": DOCS}),
    ],
)
def test_chat_template_options_render_as_transformers(rag, messages, kwargs):
    tok, ref = rag
    args = {"add_generation_prompt": True, **kwargs}
    want = ref.apply_chat_template(messages, tokenize=True, return_dict=False, **args)
    extra = {
        k: v for k, v in kwargs.items() if k not in ("add_generation_prompt", "continue_final_message", "documents")
    }
    options = ChatOptions(
        add_generation_prompt=args["add_generation_prompt"],
        continue_final_message=kwargs.get("continue_final_message", False),
        documents=tuple(kwargs["documents"]) if "documents" in kwargs else None,
        template_kwargs=extra or None,
    )
    assert tok.encode_chat(messages, options=options) == list(want)


@pytest.mark.parametrize("name", ["v1", "v3", "v7", "tekken"])
def test_continue_final_message_is_mistral_commons_prefix(name):
    """The final assistant message left open: mistral-common's AssistantMessage(prefix=True), no EOS after it."""
    system = {"role": "system", "content": "Be brief."}
    messages = [system, *OPEN] if name != "v1" else OPEN
    options = ChatOptions(add_generation_prompt=False, continue_final_message=True)
    converted = [UserMessage(content=CHAT[0]["content"]), AssistantMessage(content=OPEN[1]["content"], prefix=True)]
    if name != "v1":
        converted.insert(0, SystemMessage(content="Be brief."))
    want = reference(name).encode_chat_completion(ChatCompletionRequest(messages=converted)).tokens
    ids = mixserve(name).encode_chat(messages, options=options)
    assert ids == want and ids[-1] != mixserve(name).eos_id
    # add_generation_prompt has no place in a Mistral format: the prompt is the same either way
    assert mixserve(name).encode_chat(CHAT, options=ChatOptions(add_generation_prompt=False)) == mixserve(
        name
    ).encode_chat(CHAT)


def test_chat_options_that_cannot_go_together_name_the_field(rag):
    tok, _ = rag
    for t in (tok, mixserve("v3")):
        with pytest.raises(ChatFormatError) as err:
            t.encode_chat(OPEN, options=ChatOptions(add_generation_prompt=True, continue_final_message=True))
        assert err.value.param == "continue_final_message"
        with pytest.raises(ChatFormatError) as err:
            t.encode_chat(CHAT, options=ChatOptions(add_generation_prompt=False, continue_final_message=True))
        assert err.value.param == "continue_final_message"
    with pytest.raises(ChatFormatError) as err:
        tok.encode_chat(CHAT, options=ChatOptions(template_kwargs={"messages": []}))
    assert err.value.param == "chat_template_kwargs"


def _vllm_decode(sp: spm.SentencePieceProcessor, ids: list[int], spaces: bool) -> str:
    """vLLM's slow-detokenizer rule, on sentencepiece itself: control tokens as their pieces, each run of other
    tokens decoded alone, the parts joined by a space (or nothing)."""
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if sp.is_control(i):
            if run:
                parts.append(sp.decode(run))
                run = []
            parts.append(sp.id_to_piece(i))
        else:
            run.append(i)
    if run:
        parts.append(sp.decode(run))
    return (" " if spaces else "").join(parts)


@pytest.mark.parametrize("spaces", [True, False])
def test_special_tokens_kept_as_vllm_writes_them_whole_and_streamed(spaces):
    tok = mixserve("v3")
    sp = spm.SentencePieceProcessor(model_file=str(DATA / FILES["v3"]))
    rng = random.Random(7)
    controls = [1, 2, *(tok.special_id(p) for p in ("[INST]", "[/INST]", "[TOOL_CALLS]"))]
    text = tok.encode("Hello there, 中文 and 🦜 streams.", bos=False)
    for _ in range(20):
        ids = list(text)
        for _ in range(4):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(controls))
        want = _vllm_decode(sp, ids, spaces)
        assert tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=spaces) == want
        detok = IncrementalDetokenizer(tok, skip_special_tokens=False, spaces_between_special_tokens=spaces)
        assert "".join(detok.add(i) for i in ids) + detok.flush() == want
        assert tok.decode(ids) == sp.decode(ids)  # skipped (the default): sentencepiece's own decode


def test_byte_fallback_tokens_are_their_text_and_bytes():
    """As OpenAI and vLLM report logprobs: <0x0A> is "\\n" with bytes [10]; a lone byte of a longer character keeps
    its byte (the replacement character as text); a word piece's leading marker is a space; a control token is its
    piece."""
    tok = mixserve("v1")
    sp = spm.SentencePieceProcessor(model_file=str(DATA / FILES["v1"]))
    newline, lead = sp.piece_to_id("<0x0A>"), sp.piece_to_id("<0xE4>")
    assert (tok.token_text(newline), tok.token_bytes(newline)) == ("\n", b"\n")
    assert (tok.token_text(lead), tok.token_bytes(lead)) == ("\ufffd", b"\xe4")
    hello = sp.piece_to_id("▁Hello")
    assert (tok.token_text(hello), tok.token_bytes(hello)) == (" Hello", b" Hello")
    assert (tok.token_text(2), tok.token_bytes(2)) == ("</s>", b"</s>")
    assert tok.is_special(2) and not tok.is_special(newline)


def test_chat_options_default_is_the_plain_prompt():
    """No options: the same ids as before (the generation prompt, no documents)."""
    for name in ("v1", "v3"):
        assert mixserve(name).encode_chat(CHAT, options=ChatOptions()) == mixserve(name).encode_chat(CHAT)
