"""vLLM's request extensions over real HTTP (the official `openai` client, ``extra_body`` as vLLM's docs use it)
and gRPC (a stub generated from our proto), each against its vLLM meaning on the shared random-weight model: the
offline ``LLM`` with the same sampling parameters (whose engine semantics test_vllm_sampling.py checks against
transformers and sentencepiece) and mistral-common's chat encoding are the references."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from openai import OpenAI

from cluster import SamplingParams
from cluster.serve.proto import mixserve_pb2 as pb
from tests.helpers import SCHEMA
from tests.serving.helpers import API_KEY, GRPC_AUTH, MODEL_NAME, post
from tests.tokenizer_refs import reference

pytestmark = [pytest.mark.ray, pytest.mark.serving]
USER = [{"role": "user", "content": "Tell me a story."}]
PROMPT = [1, 330, 1000, 2000, 77, 415, 2936]
NEWLINE = 13  # <0x0A> in the Mixtral-8x7B vocabulary


@pytest.fixture(scope="module")
def client(served):
    base, _, _ = served
    c = OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    yield c
    c.close()


def error_param(error: openai.APIStatusError) -> Any:
    body: Any = error.body
    return body["param"]


def offline(llm, prompt: list[int], **params: Any):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs[0]


def test_continuous_usage_stats_puts_usage_in_every_chunk(client):
    """What a vLLM benchmark client sends: every chunk carries the usage so far; the last one the whole usage."""
    for options in ({"include_usage": True, "continuous_usage_stats": True}, {"continuous_usage_stats": True}):
        stream = client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            n=2,
            stream=True,
            stream_options=options,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        assert all(c.usage is not None and c.usage.prompt_tokens == len(PROMPT) for c in chunks)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
        for i in (0, 1):
            seen = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].index == i]
            assert seen == sorted(seen) and seen[-1] == 12
    chat = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=USER,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        )
    )
    assert all(c.usage is not None for c in chat) and chat[0].usage.completion_tokens == 0
    done = chat[-1].usage
    assert [c.usage.completion_tokens for c in chat if c.choices][-1] == done.completion_tokens
    plain = list(client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, stream=True))
    assert all(c.usage is None for c in plain)  # no stream_options: no usage, as before


def test_include_stop_str_in_output(client, reference_llm):
    whole = offline(reference_llm, PROMPT, max_tokens=16, temperature=0, ignore_eos=True).text
    k = next(k for k in range(4, len(whole) - 3) if whole.find(whole[k : k + 3]) == k and whole[k] != " ")
    stop = whole[k : k + 3]
    body = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    cut = client.completions.create(**body, extra_body={"ignore_eos": True})
    kept = client.completions.create(**body, extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert cut.choices[0].text == whole[:k] and kept.choices[0].text == whole[: k + 3]
    assert cut.model_extra is not None and kept.choices[0].model_extra == {"stop_reason": stop}
    streamed = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=16,
        temperature=0,
        stream=True,
        stop=[stop],
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    ids = reference_llm.tokenizer.encode_chat(USER)
    ref = offline(
        reference_llm, ids, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref.text


def test_special_tokens_kept_and_allowed_token_ids(client, reference_llm):
    allowed = [2, 415, 2936, 1014]
    extra = {"ignore_eos": True, "allowed_token_ids": allowed, "return_tokens_as_token_ids": True}
    body = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=3, logprobs=0)
    skipped = client.completions.create(**body, extra_body=extra)
    ids = [int(t.removeprefix("token_id:")) for t in skipped.choices[0].logprobs.tokens]
    assert len(ids) == 16 and set(ids) <= set(allowed) and 2 in ids
    for spaces in (True, False):
        kept = client.completions.create(
            **body, extra_body={**extra, "skip_special_tokens": False, "spaces_between_special_tokens": spaces}
        )
        ref = offline(
            reference_llm,
            PROMPT,
            max_tokens=16,
            temperature=1.0,
            seed=3,
            ignore_eos=True,
            allowed_token_ids=allowed,
            skip_special_tokens=False,
            spaces_between_special_tokens=spaces,
        )
        assert ref.token_ids == ids and kept.choices[0].text == ref.text and "</s>" in ref.text


def test_bad_words_and_truncate_prompt_tokens(client, reference_llm):
    free = offline(reference_llm, PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    tok = reference_llm.tokenizer  # a generated word that is one token as a word of its own (vLLM tokenizes it so)
    word = next(w for t in free.token_ids if tok.encode(w := tok.decode([t]).strip(), bos=False) == [t])
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "bad_words": [word]},
    )
    ref = offline(reference_llm, PROMPT, max_tokens=8, temperature=0, ignore_eos=True, bad_words=(word,))
    assert r.choices[0].text == ref.text != free.text
    long = PROMPT + list(range(3000, 3010))
    r = client.completions.create(
        model=MODEL_NAME, prompt=long, max_tokens=6, temperature=0, extra_body={"truncate_prompt_tokens": 5}
    )
    assert (
        r.usage.prompt_tokens == 5
        and r.choices[0].text == offline(reference_llm, long[-5:], max_tokens=6, temperature=0).text
    )
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=4, temperature=0, extra_body={"truncate_prompt_tokens": 3}
    )
    ids = reference_llm.tokenizer.encode_chat(USER)[-3:]
    assert (
        chat.usage.prompt_tokens == 3
        and chat.choices[0].message.content == offline(reference_llm, ids, max_tokens=4, temperature=0).text
    )


def test_prompt_logprobs_on_completions_and_chat(client, reference_llm):
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    (scored,) = reference_llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))
    got = r.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(PROMPT)
    for tok, entry, ref in zip(PROMPT[1:], got[1:], scored.prompt_logprobs[1:], strict=True):
        assert (
            entry[str(tok)]["logprob"] == pytest.approx(ref.logprob, abs=1e-5) and entry[str(tok)]["rank"] == ref.rank
        )
        assert [entry[str(t)]["rank"] for t, _ in ref.top if t != tok] == [
            k + 1 for k, (t, _) in enumerate(ref.top) if t != tok
        ]
        assert entry[str(tok)]["decoded_token"] == reference_llm.tokenizer.token_text(tok)
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=2, extra_body={"prompt_logprobs": 0}
    )
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_NAME, messages=USER, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1}
        )
    assert error_param(info.value) == "prompt_logprobs"


def test_logprobs_report_a_byte_fallback_token_as_its_text(client):
    """<0x0A> is reported as "\\n" with bytes [10], as OpenAI and vLLM do; with return_tokens_as_token_ids, by id."""
    extra = {"allowed_token_ids": [NEWLINE], "ignore_eos": True}
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=2, logprobs=True, top_logprobs=1, extra_body=extra
    )
    entries = chat.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in entries] == [("\n", [10])] * 2 and chat.choices[0].message.content == "\n\n"
    legacy = client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, logprobs=1, extra_body=extra)
    assert legacy.choices[0].logprobs.tokens == ["\n", "\n"] and legacy.choices[0].logprobs.text_offset == [0, 1]
    ids = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=1,
        logprobs=True,
        extra_body={**extra, "return_tokens_as_token_ids": True},
    )
    (entry,) = ids.choices[0].logprobs.content
    assert (entry.token, entry.bytes) == ("token_id:13", list(b"token_id:13"))


def test_chat_template_fields_and_chat_echo(client, reference_llm):
    """continue_final_message: the v1 format's open assistant turn (mistral-common's prefix=True); echo puts the
    final assistant message first; documents and chat_template_kwargs have no place in a Mistral format."""
    opened = [*USER, {"role": "assistant", "content": "Once upon"}]
    want = (
        reference("v1")
        .encode_chat_completion(
            ChatCompletionRequest(
                messages=[UserMessage(content=USER[0]["content"]), AssistantMessage(content="Once upon", prefix=True)]
            )
        )
        .tokens
    )
    ref = offline(reference_llm, want, max_tokens=6, temperature=0)
    extra = {"continue_final_message": True, "add_generation_prompt": False, "echo": True}
    r = client.chat.completions.create(model=MODEL_NAME, messages=opened, max_tokens=6, temperature=0, extra_body=extra)  # type: ignore[arg-type]
    assert r.usage.prompt_tokens == len(want) and r.choices[0].message.content == "Once upon" + ref.text
    streamed = client.chat.completions.create(
        model=MODEL_NAME,
        messages=opened,
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        extra_body={"continue_final_message": True, "echo": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Once upon" + ref.text
    plain = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=4, temperature=0)
    same = client.chat.completions.create(
        model=MODEL_NAME,
        messages=USER,
        max_tokens=4,
        temperature=0,
        extra_body={
            "documents": [{"title": "t", "text": "x"}],
            "chat_template_kwargs": {"enable_thinking": False},
            "add_generation_prompt": True,
            "echo": True,
            "prediction": None,
            "length_penalty": 1.0,
            "priority": 0,
            "use_beam_search": False,
            "cache_salt": "tenant-a",
        },
    )
    assert (same.usage.prompt_tokens, same.choices[0].message.content) == (
        plain.usage.prompt_tokens,
        plain.choices[0].message.content,
    )


def test_request_id_names_the_response(client, served):
    r = client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, extra_body={"request_id": "abc-1"})
    assert r.id == "cmpl-abc-1"
    c = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=2, extra_body={"request_id": "abc-2"}
    )
    assert c.id == "chatcmpl-abc-2"


def test_structured_outputs_constrain_the_output(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, max_tokens=64, n=4, seed=2, extra_body={"structured_outputs": {"json": SCHEMA}}
    )
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    r = client.completions.create(
        model=MODEL_NAME,
        prompt="Colour:",
        max_tokens=8,
        n=4,
        seed=3,
        extra_body={"structured_outputs": {"choice": ["red", "blue"]}},
    )
    assert {c.text for c in r.choices} <= {"red", "blue"}
    r = client.completions.create(
        model=MODEL_NAME,
        prompt="Code:",
        max_tokens=12,
        seed=4,
        extra_body={"structured_outputs": {"regex": r"[a-z]{3}-[0-9]{2}"}},
    )
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", r.choices[0].text)


REFUSED = [
    ({"priority": 1}, "priority"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "structured_outputs"),
    ({"truncate_prompt_tokens": 5000}, "truncate_prompt_tokens"),
    ({"allowed_token_ids": [99999]}, "allowed_token_ids"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    ({"continue_final_message": True}, "continue_final_message"),  # the final message is the user's
    ({"best_of_n": 2}, "best_of_n"),  # in neither API
]


@pytest.mark.parametrize(("extra", "param"), REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)])
def test_what_cannot_be_honoured_is_a_400_naming_it(served, extra, param):
    base, _, _ = served
    r = post(base, "/v1/chat/completions", {"model": MODEL_NAME, "messages": USER, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_grpc_takes_the_same_extensions(stub, reference_llm):
    allowed = [2, 415, 2936, 1014]
    request = pb.GenerateRequest(
        prompt_token_ids=PROMPT,
        max_tokens=10,
        temperature=1.0,
        seed=3,
        ignore_eos=True,
        allowed_token_ids=allowed,
        skip_special_tokens=False,
        logprobs=0,
        return_tokens_as_token_ids=True,
        continuous_usage_stats=True,
    )
    replies = list(stub.GenerateStream(request, metadata=GRPC_AUTH))
    ref = offline(
        reference_llm,
        PROMPT,
        max_tokens=10,
        temperature=1.0,
        seed=3,
        ignore_eos=True,
        allowed_token_ids=allowed,
        skip_special_tokens=False,
    )
    assert [t for r in replies for t in r.token_ids] == ref.token_ids and "".join(r.text for r in replies) == ref.text
    assert [lp.token for r in replies for lp in r.logprobs] == [f"token_id:{t}" for t in ref.token_ids]
    assert [r.usage.completion_tokens for r in replies] == list(range(1, 11))  # every reply: the usage so far
    scored = stub.Generate(
        pb.GenerateRequest(prompt_token_ids=PROMPT, max_tokens=1, prompt_logprobs=1), metadata=GRPC_AUTH
    )
    (ref_scored,) = reference_llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    assert len(scored.prompt_logprobs) == len(PROMPT) and not scored.prompt_logprobs[0].HasField("logprob")
    for got, want in zip(scored.prompt_logprobs[1:], ref_scored.prompt_logprobs[1:], strict=True):
        assert want is not None and (got.token_id, got.rank) == (want.token_id, want.rank)
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
    r = stub.Generate(
        pb.GenerateRequest(prompt_token_ids=PROMPT, max_tokens=2, allowed_token_ids=[NEWLINE], logprobs=0),
        metadata=GRPC_AUTH,
    )
    assert [(lp.token, lp.token_bytes) for lp in r.logprobs] == [("\n", b"\n")] * 2
    whole = offline(reference_llm, PROMPT, max_tokens=16, temperature=0, ignore_eos=True).text
    stop = whole[5:8]
    r = stub.Generate(
        pb.GenerateRequest(
            prompt_token_ids=PROMPT,
            max_tokens=16,
            temperature=0,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        metadata=GRPC_AUTH,
    )
    assert r.text == whole[: whole.find(stop) + 3] and r.stop_reason == stop
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(prompt="x", priority=2), metadata=GRPC_AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in str(info.value.details())


def test_grpc_max_tokens_defaults_as_http_chat(served, stub, reference_llm):
    """With messages and no max_tokens: what is left of the 4096-token context, over gRPC as over HTTP."""
    base, _, _ = served
    text = " ".join(["story"] * 4086)
    messages = [{"role": "user", "content": text}]
    room = 4096 - len(reference_llm.tokenizer.encode_chat(messages))
    assert 1 <= room <= 12
    r = stub.Generate(
        pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=text)], ignore_eos=True), metadata=GRPC_AUTH
    )
    h = post(base, "/v1/chat/completions", {"model": MODEL_NAME, "messages": messages, "ignore_eos": True}, timeout=300)
    assert len(r.token_ids) == room == h.json()["usage"]["completion_tokens"] and r.finish_reason == "length"


def test_unknown_fields_stay_400(served):
    base, _, _ = served
    r = httpx.post(
        f"{base}/v1/completions",
        json={"prompt": "x", "vllm_frobnicate": 1},
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_frobnicate"
