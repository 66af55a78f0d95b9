"""The serving edge without a server: request parsing, API-key and model checks, response encoding, logprobs."""

from __future__ import annotations

import json
import math

import pytest

from cluster.errors import AuthenticationError, InvalidRequestError, ModelNotFoundError, SamplingParamsError
from cluster.sampling import TokenLogprob
from cluster.serve.auth import check_api_key, check_model
from cluster.serve.logprobs import chat_logprobs, completion_logprobs, piece_text
from cluster.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatStreamChoice,
    CompletionRequest,
    CompletionStreamResponse,
    Usage,
    parse_body,
)
from cluster.serve.streams import sse_event
from cluster.tokenizer import Tokenizer


@pytest.mark.parametrize(
    ("raw", "needle", "param"),
    [
        (b"{not json", "not valid JSON", None),
        (b"\xff\xfe", "not valid JSON", None),
        (b"", "must be a JSON object", None),
        (b"[1, 2]", "must be a JSON object", None),
        (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens", "max_tokens"),
        (b'{"max_tokens": 4}', "prompt", "prompt"),
        (b'{"prompt": "x", "stream": "yes"}', "stream", "stream"),
    ],
)
def test_parse_body_names_the_bad_field(raw, needle, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_body(raw, CompletionRequest)
    assert needle in info.value.message and info.value.param == param


def test_parse_body_nested_field_and_sampling_errors():
    with pytest.raises(InvalidRequestError) as info:
        parse_body(b'{"messages": [{"role": "robot", "content": "x"}]}', ChatCompletionRequest)
    assert info.value.param == "messages.0.role"
    req = parse_body(b'{"prompt": "x", "top_p": 2}', CompletionRequest)
    with pytest.raises(SamplingParamsError) as sp:
        req.params()
    assert sp.value.param == "top_p"
    assert parse_body(b'{"prompt": "x", "stop": "END"}', CompletionRequest).params().stop == ("END",)


def test_api_key():
    check_api_key(None, None)  # no key configured: anyone
    check_api_key("k3y", "Bearer k3y")
    check_api_key("k3y", "bearer  k3y ")
    for header, needle in ((None, "missing"), ("", "missing"), ("Bearer nope", "invalid"), ("Basic k3y", "invalid")):
        with pytest.raises(AuthenticationError, match=needle):
            check_api_key("k3y", header)


def test_model_name():
    for name in (None, "", "served"):
        check_model("served", name)
    with pytest.raises(ModelNotFoundError) as info:
        check_model("served", "gpt-4")
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
