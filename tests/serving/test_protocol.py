"""The serving edge without a server: request parsing and its limits, API keys and model checks, response
encoding, logprobs."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from cluster.engine.sampling import TokenLogprob
from cluster.errors import (
    AppArgsError,
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    SamplingParamsError,
)
from cluster.serve.ingress import auth
from cluster.serve.ingress.auth import ApiKeys, check_model
from cluster.serve.ingress.body import MAX_JSON_DEPTH, check_prompt_chars, parse_body
from cluster.serve.ingress.openai_api.logprobs import chat_logprobs, completion_logprobs, piece_text
from cluster.serve.ingress.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from cluster.serve.ingress.openai_api.responses import (
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatStreamChoice,
    CompletionStreamResponse,
    Usage,
)
from cluster.serve.ingress.streams import sse_event
from cluster.text.tokenizer import Tokenizer


@pytest.mark.parametrize(
    ("raw", "needle", "param"),
    [
        (b"{not json", "not valid JSON", None),
        (b"\xff\xfe", "not UTF-8", None),
        (b"", "must be a JSON object", None),
        (b"[1, 2]", "must be a JSON object", None),
        (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens", "max_tokens"),
        (b'{"max_tokens": 4}', "prompt", "prompt"),
        (b'{"prompt": "x", "stream": "yes"}', "stream", "stream"),
        (b'{"prompt": "x", "bogus": 1}', "unknown field", "bogus"),
        (b'{"prompt": "x", "guided_choice": "a"}', "valid list", "guided_choice"),
        (b'{"prompt": "x", "functions": []}', "use tools", "functions"),
        (b'{"prompt": "x", "n": 1' + b"0" * 50 + b"}", "out of range", "n"),
        (b'{"prompt": "x", "top_p": 1e500}', "out of range", "top_p"),
        (b'{"prompt": "x", "top_p": Infinity}', "Infinity", None),
        (b'{"prompt": "\\udc00"}', "lone surrogate", "prompt"),
        (b'{"prompt": "ok", "user": {"\\ud800": 1}}', "lone surrogate", "user"),
        (b'{"prompt": ' + b"[" * 65 + b"]" * 65 + b"}", "nested", "prompt"),
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested", None),
    ],
)
def test_parse_body_names_the_bad_field(raw, needle, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_body(raw, CompletionRequest)
    assert needle in info.value.message and info.value.param == param


def test_parse_body_within_limits():
    deep = (
        b'{"messages": [], "metadata": ' + b'{"a": ' * (MAX_JSON_DEPTH - 2) + b"1" + b"}" * (MAX_JSON_DEPTH - 2) + b"}"
    )
    with pytest.raises(InvalidRequestError) as info:  # accepted as JSON; metadata is a flat map of strings
        parse_body(deep, ChatCompletionRequest)
    assert "nested" not in info.value.message and info.value.param.startswith("metadata")
    big = b'{"prompt": [' + b",".join([b"31999"] * 200_000) + b"]}"
    assert len(parse_body(big, CompletionRequest).prompts()[0]) == 200_000
    assert (
        parse_body('{"prompt": "\\ud83d\\ude00 caf\u00e9"}'.encode(), CompletionRequest).prompt
        == "\U0001f600 caf\u00e9"
    )


def test_parse_body_nested_field_and_sampling_errors():
    with pytest.raises(InvalidRequestError) as info:
        parse_body(b'{"messages": [{"role": "robot", "content": "x"}]}', ChatCompletionRequest)
    assert info.value.param == "messages.0.role"
    req = parse_body(b'{"prompt": "x", "top_p": 2}', CompletionRequest)
    with pytest.raises(SamplingParamsError) as sp:
        req.params(vocab_size=32000)
    assert sp.value.param == "top_p"
    assert parse_body(b'{"prompt": "x", "stop": "END"}', CompletionRequest).params(vocab_size=32000).stop == ("END",)


def test_sampling_fields_become_sampling_params():
    body = {"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2, "min_p": 0.1,
            "min_tokens": 3, "max_tokens": 8, "logit_bias": {"12": 5, "7": -100.0}, "top_k": 40, "seed": 3}  # fmt: skip
    p = parse_body(json.dumps(body).encode(), CompletionRequest).params(vocab_size=32000)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == (
        0.5, -1, 1.2, 0.1, 3)  # fmt: skip
    assert dict(p.logit_bias) == {12: 5.0, 7: -100.0} and (p.top_k, p.seed, p.max_tokens) == (40, 3, 8)
    default = parse_body(b'{"prompt": "x"}', CompletionRequest).params(vocab_size=32000)
    assert (default.presence_penalty, default.repetition_penalty, default.min_p, default.logit_bias) == (0, 1, 0, ())
    for bias in ({"32000": 1}, {"-1": 1}, {"1.5": 1}, {"\u00b2": 1}):
        with pytest.raises(InvalidRequestError) as info:
            parse_body(json.dumps({"prompt": "x", "logit_bias": bias}).encode(), CompletionRequest).params(
                vocab_size=32000
            )
        assert info.value.param == "logit_bias"


def test_prompt_character_bound():
    check_prompt_chars(4096 * 32, 4096, "prompt")
    with pytest.raises(PromptTooLongError) as info:
        check_prompt_chars(4096 * 32 + 1, 4096, "messages")
    assert info.value.param == "messages" and "characters" in info.value.message


def test_api_keys_from_arguments_environment_and_file(tmp_path, monkeypatch):
    assert not ApiKeys().enabled
    ApiKeys().check(None)  # no key configured: anyone
    monkeypatch.setenv("MY_KEYS", " e1 ,e2,, ")
    secret = tmp_path / "keys"
    secret.write_text("# rotated weekly\nf1\n\n  f2  \n")
    keys = ApiKeys(["a1"], env="MY_KEYS", file=str(secret))
    assert len(keys) == 5
    for key in ("a1", "e1", "e2", "f1", "f2"):
        keys.check(f"Bearer {key}")
        keys.check(f"bearer {key}")
    for header, needle in ((None, "missing"), ("", "missing"), ("Bearer nope", "invalid"), ("Basic a1", "invalid"),
                           ("Bearer  a1", "invalid"), ("Bearer a1 ", "invalid"), ("Bearer a", "invalid"),
                           ("Bearer a1a1", "invalid"), ("a1", "invalid"), ("Bearer e1,e2", "invalid"),
                           ("Bearer # rotated weekly", "invalid")):  # fmt: skip
        with pytest.raises(AuthenticationError, match=needle):
            keys.check(header)
    with pytest.raises(AppArgsError, match="api_key_file"):
        ApiKeys(file=str(tmp_path / "missing"))


def test_api_keys_compare_every_character(tmp_path, monkeypatch):
    """Long keys are compared whole: a key that differs from a valid one only in its last character, one that is a
    prefix of a valid one (longer than 8 characters), and a valid one with a character added are all refused,
    whichever source (argument, environment, file) the valid key came from."""
    long_keys = ["sk-mixserve-live-0123456789abcdef", "sk-mixserve-live-0123456789abcdeg"]
    monkeypatch.setenv("LONG_KEYS", "sk-mixserve-env-00000000000000001")
    secret = tmp_path / "keys"
    secret.write_text("sk-mixserve-file-00000000000000001\n")
    keys = ApiKeys(long_keys, env="LONG_KEYS", file=str(secret))
    valid = [*long_keys, "sk-mixserve-env-00000000000000001", "sk-mixserve-file-00000000000000001"]
    for key in valid:
        keys.check(f"Bearer {key}")
    refused = [
        "sk-mixserve-live-0123456789abcdeh",  # the same 32 first characters as both valid live keys
        "sk-mixserve-live-0123456789abcde",  # a prefix of both
        "sk-mixserve-live-0123456789abcdefg",  # a valid key and one more character
        "sk-mixserve-live-",
        "sk-mixse",  # the first 8 characters
        "sk-mixserve-env-00000000000000002",
        "sk-mixserve-env-0000000000000000",
        "sk-mixserve-file-00000000000000002",
        "sk-mixserve-file-0000000000000000",
        "Sk-mixserve-live-0123456789abcdef",  # case matters in the key (not in the scheme)
    ]
    for key in refused:
        with pytest.raises(AuthenticationError, match="invalid API key"):
            keys.check(f"Bearer {key}")


def test_api_key_file_rotation(tmp_path, monkeypatch):
    secret = tmp_path / "keys"
    secret.write_text("old\n")
    keys = ApiKeys(file=str(secret))
    keys.check("Bearer old")
    secret.write_text("new\n")
    os.utime(secret, (time.time() + 5, time.time() + 5))
    monkeypatch.setattr(auth, "FILE_CHECK_INTERVAL_S", 0.0)
    keys.check("Bearer new")
    with pytest.raises(AuthenticationError):
        keys.check("Bearer old")
    secret.unlink()  # a Secret being swapped: the keys read last stay
    keys.check("Bearer new")


def test_model_name():
    for name in (None, "", "served", "alias"):
        check_model(["served", "alias"], name)
    with pytest.raises(ModelNotFoundError) as info:
        check_model(["served", "alias"], "gpt-4")
    assert info.value.param == "model" and "does not exist" in info.value.message


def _event(payload) -> dict:
    raw = sse_event(payload).decode()
    assert raw.startswith("data: ") and raw.endswith("\n\n")
    return json.loads(raw.removeprefix("data: "))


def test_stream_chunks_leave_out_unset_delta_fields_and_usage():
    def chat_chunk(delta: ChatDelta) -> dict:
        choice = ChatStreamChoice(index=0, delta=delta)
        return _event(ChatCompletionStreamResponse(id="c", created=1, model="m", choices=[choice]))

    first = chat_chunk(ChatDelta(role="assistant", content=""))
    assert first["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}  # fmt: skip
    assert "usage" not in first and first["object"] == "chat.completion.chunk"
    assert chat_chunk(ChatDelta(content="hi"))["choices"][0]["delta"] == {"content": "hi"}
    assert chat_chunk(ChatDelta())["choices"][0]["delta"] == {}
    last = _event(CompletionStreamResponse(id="c", created=1, model="m", choices=[], usage=Usage.of(3, 2)))
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert last["choices"] == [] and last["object"] == "text_completion"


def test_logprob_shapes():
    tok = Tokenizer.from_dir(None)
    ids = tok.encode("Hello world", bos=False)
    lps = [TokenLogprob(token_id=i, logprob=-0.5, top=((i, -0.5), (2, -float("inf")))) for i in ids]
    comp = completion_logprobs(tok, lps, offset=3)
    assert comp is not None
    assert comp.tokens == [piece_text(tok, i) for i in ids]
    assert comp.text_offset[0] == 3 and comp.text_offset[1] == 3 + len(comp.tokens[0])
    assert comp.top_logprobs[0][piece_text(tok, 2)] == -math.inf
    assert "-Infinity" in comp.model_dump_json()  # as json.dumps writes it, and clients read it
    chat = chat_logprobs(tok, lps)
    assert chat is not None
    entry = chat.content[0]
    assert entry.token == piece_text(tok, ids[0]) and bytes(entry.bytes).decode() == entry.token
    assert [t.token for t in entry.top_logprobs] == [piece_text(tok, ids[0]), piece_text(tok, 2)]
    assert completion_logprobs(tok, None, 0) is None and chat_logprobs(tok, None) is None
