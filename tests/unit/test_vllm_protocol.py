"""vLLM's request extensions at the serving edge without a server: the strict request models take each field of
vLLM's protocol with vLLM's meaning (SamplingParams, chat template options, usage flags, response ids), refuse by
name only what cannot be honoured, and a gRPC GenerateRequest maps to the same HTTP body; logprobs report a
byte-fallback token as its text and bytes, or as ``token_id:<id>``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.engine.sampling import StructuredOutput, TokenLogprob
from cluster.errors import InvalidRequestError
from cluster.serve.ingress.body import parse_body
from cluster.serve.ingress.grpc_api.request import http_body
from cluster.serve.ingress.openai_api.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from cluster.serve.ingress.openai_api.protocol import ChatCompletionRequest, CompletionRequest, usage_flags
from cluster.serve.ingress.openai_api.structured import request_constraint
from cluster.serve.proto import mixserve_pb2 as pb
from cluster.text.chat_template import ChatOptions
from tests.tokenizer_refs import mixserve

CHAT = [{"role": "user", "content": "Hi"}]


def completion(**body: Any) -> CompletionRequest:
    return parse_body(json.dumps({"prompt": "x", **body}).encode(), CompletionRequest)


def chat(**body: Any) -> ChatCompletionRequest:
    return parse_body(json.dumps({"messages": CHAT, **body}).encode(), ChatCompletionRequest)


def test_sampling_extensions_reach_sampling_params():
    req = completion(
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        truncate_prompt_tokens=5,
        prompt_logprobs=2,
        allowed_token_ids=[3, 4],
        bad_words=["no"],
        cache_salt="s",
        priority=0,
        length_penalty=0.5,
        use_beam_search=False,
        return_tokens_as_token_ids=True,
    )
    p = req.params(vocab_size=32000)
    assert (p.include_stop_str_in_output, p.skip_special_tokens, p.spaces_between_special_tokens) == (
        True,
        False,
        False,
    )
    assert (p.truncate_prompt_tokens, p.prompt_logprobs, p.allowed_token_ids) == (5, 2, (3, 4))
    assert (p.bad_words, p.cache_salt) == (("no",), "s")
    echoed = completion(echo=True, logprobs=3, prompt_logprobs=1).params(vocab_size=32000)
    assert echoed.prompt_logprobs == 3  # as many alternatives as either wants
    assert chat(prompt_logprobs=0).params(max_tokens_default=10, vocab_size=32000).prompt_logprobs == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"priority": 1}, "priority"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
    ],
)
def test_what_cannot_be_honoured_is_400_naming_it(body, param):
    with pytest.raises(InvalidRequestError) as err:
        completion(**body).params(vocab_size=32000)
    assert err.value.param == param


def test_chat_template_fields_and_echo():
    assert chat().chat_options() == ChatOptions()
    opened = chat(messages=[*CHAT, {"role": "assistant", "content": "Well,"}], continue_final_message=True, echo=True)
    assert opened.chat_options() == ChatOptions(add_generation_prompt=False, continue_final_message=True)
    assert opened.echoed(opened.messages) == "Well," and chat(echo=True).echoed(chat().messages) == ""
    kw = chat(chat_template_kwargs={"persona": "x", "add_generation_prompt": False}, documents=[{"title": "t"}])
    assert kw.chat_options() == ChatOptions(False, False, ({"title": "t"},), {"persona": "x"})
    with pytest.raises(InvalidRequestError) as err:
        chat(add_generation_prompt=True, continue_final_message=True).chat_options()
    assert err.value.param == "continue_final_message"
    with pytest.raises(InvalidRequestError) as err:
        chat(prediction={"type": "content", "content": "x"})
    assert err.value.param == "prediction"
    assert chat(prediction=None, echo=False).echo is False


def test_stream_usage_flags_as_vllm():
    assert usage_flags(chat(stream=True).stream_options) == (False, False)
    flags = [({"include_usage": True}, (True, False)), ({"continuous_usage_stats": True}, (True, True))]
    flags += [({"include_usage": False, "continuous_usage_stats": True}, (False, False))]
    for options, want in flags:
        assert usage_flags(chat(stream=True, stream_options=options).stream_options) == want


def test_structured_outputs_is_one_constraint():
    assert request_constraint(chat(structured_outputs={"choice": ["a", "b"]})).output == StructuredOutput(
        "choice", '["a", "b"]'
    )
    schema = {"type": "object"}
    got = request_constraint(chat(structured_outputs={"json": schema, "disable_any_whitespace": True}))
    assert got.output == StructuredOutput("json_schema", json.dumps(schema)) and got.param == "structured_outputs"
    assert request_constraint(chat(structured_outputs={"json_object": True})).output.kind == "json_object"
    for bad in ({"regex": "a", "choice": ["a"]}, {}, {"structural_tag": "x", "regex": "a"}, {"json_object": False}):
        with pytest.raises(InvalidRequestError) as err:
            request_constraint(chat(structured_outputs=bad))
        assert err.value.param == "structured_outputs"
    with pytest.raises(InvalidRequestError) as err:
        request_constraint(chat(guided_regex="a", structured_outputs={"regex": "b"}))
    assert err.value.param == "structured_outputs"


def test_grpc_request_is_the_same_http_body():
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Hi")],
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        allowed_token_ids=[3],
        bad_words=["x"],
        prompt_logprobs=1,
        truncate_prompt_tokens=4,
        continue_final_message=True,
        add_generation_prompt=False,
        chat_template_kwargs='{"persona": "p"}',
        documents=[pb.Document(fields={"title": "t"})],
        cache_salt="s",
        return_tokens_as_token_ids=True,
    )
    body = http_body(request, stream=False)
    assert "max_tokens" not in body  # with messages: what is left of the context, as HTTP chat
    assert body["allowed_token_ids"] == [3] and body["bad_words"] == ["x"] and body["cache_salt"] == "s"
    assert body["chat_template_kwargs"] == {"persona": "p"} and body["documents"] == [{"title": "t"}]
    assert (body["continue_final_message"], body["add_generation_prompt"], body["skip_special_tokens"]) == (
        True,
        False,
        False,
    )
    assert http_body(pb.GenerateRequest(prompt="x"), stream=False)["max_tokens"] == 16
    with pytest.raises(InvalidRequestError) as err:
        http_body(pb.GenerateRequest(prompt="x", continue_final_message=True), stream=False)
    assert err.value.param == "continue_final_message"


def test_logprobs_report_byte_fallback_tokens_as_text_and_bytes():
    tok = mixserve("v1")
    newline, hello = 13, tok.encode("Hello", bos=False)[0]
    assert tok.id_to_piece(newline) == "<0x0A>"
    lps = [TokenLogprob(newline, -0.5, ((newline, -0.5), (hello, -1.0)), rank=1)]
    c = chat_logprobs(tok, lps)
    assert c is not None and (c.content[0].token, c.content[0].bytes) == ("\n", [10])
    assert [(t.token, t.bytes) for t in c.content[0].top_logprobs] == [("\n", [10]), (" Hello", list(b" Hello"))]
    ids = chat_logprobs(tok, lps, as_ids=True)
    assert ids is not None and (ids.content[0].token, ids.content[0].bytes) == ("token_id:13", list(b"token_id:13"))
    legacy = completion_logprobs(tok, lps, 0)
    assert legacy is not None and legacy.tokens == ["\n"] and legacy.top_logprobs == [{"\n": -0.5, " Hello": -1.0}]
    scored = prompt_logprobs(tok, [None, *lps], 1)
    assert scored is not None and scored[0] is None
    assert {k: (v.logprob, v.rank, v.decoded_token) for k, v in scored[1].items()} == {"13": (-0.5, 1, "\n")}
