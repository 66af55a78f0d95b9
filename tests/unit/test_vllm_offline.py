"""The offline API used exactly as vLLM's documentation uses it, with only the import line changed: the offline
quickstart (``LLM(model=...)``, ``llm.generate(prompts, sampling_params)``, ``output.prompt``,
``output.outputs[0].text``) and ``llm.chat`` (a conversation, a batch of them, tools). Results against the
independent references: transformers' greedy tokens and mistral-common's chat encoding."""

from __future__ import annotations

import shutil

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Tool

from cluster import LLM, SamplingParams  # vLLM: from vllm import LLM, SamplingParams
from cluster.errors import InvalidRequestError
from tests.helpers import hf_greedy, hf_mixtral
from tests.tokenizer_refs import DATA, FILES, reference

PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I assist you today?"},
    {"role": "user", "content": "Write an essay about the importance of higher education."},
]


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offline_v1")
    return folder, hf_mixtral(folder, seed=41)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """A model with Mistral's v3 tokenizer (tools in the prompt), vocabulary 32768."""
    folder = tmp_path_factory.mktemp("offline_v3")
    model = hf_mixtral(folder, seed=42, vocab_size=32768)
    shutil.copy(DATA / FILES["v3"], folder / "tokenizer.model.v3")
    return folder, model


def test_vllm_offline_quickstart_runs_unchanged(v1, capsys):
    folder, model = v1
    # --- vLLM's offline quickstart (docs: getting_started/quickstart), the model path aside ---
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    llm = LLM(model=str(folder))
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
    # ---
    printed = capsys.readouterr().out.splitlines()
    assert [o.prompt for o in outputs] == prompts and len(printed) == 4
    for output, line in zip(outputs, printed, strict=True):
        (choice,) = output.outputs
        assert line == f"Prompt: {output.prompt!r}, Generated text: {choice.text!r}"
        assert choice.index == 0 and 1 <= len(choice.token_ids) <= 16 and choice.finish_reason in ("stop", "length")
        assert choice.cumulative_logprob is None and choice.logprobs is None  # not asked for, as in vLLM
        assert output.prompt_token_ids == llm.tokenizer.encode(output.prompt) and output.finished
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for output in greedy:
        assert output.outputs[0].token_ids == hf_greedy(model, output.prompt_token_ids, 12)
        assert output.text == output.outputs[0].text  # the fields from before repeat the first choice
    llm.shutdown()


def test_llm_chat_as_vllm_documents_it(v1):
    folder, model = v1
    llm = LLM(model=str(folder), progress=False)
    sampling_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    # --- vLLM's docs (models/generative_models: LLM.chat) ---
    conversation = CONVERSATION
    outputs = llm.chat(conversation, sampling_params=sampling_params, use_tqdm=False)
    # ---
    want = reference("v1").encode_chat_completion(
        ChatCompletionRequest(
            messages=[
                SystemMessage(content=CONVERSATION[0]["content"]),
                UserMessage(content=CONVERSATION[1]["content"]),
                AssistantMessage(content=CONVERSATION[2]["content"]),
                UserMessage(content=CONVERSATION[3]["content"]),
            ]
        )
    )
    (output,) = outputs
    assert output.prompt_token_ids == want.tokens
    assert output.outputs[0].token_ids == hf_greedy(model, want.tokens, 8)
    assert output.prompt == llm.tokenizer.decode(
        want.tokens, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    batch = llm.chat([conversation, conversation[:2]], sampling_params, use_tqdm=False)
    assert [o.prompt_token_ids for o in batch] == [want.tokens, llm.tokenizer.encode_chat(conversation[:2])]
    llm.shutdown()


def test_llm_chat_with_tools_and_an_open_final_message(v3):
    folder, model = v3
    llm = LLM(model=str(folder), progress=False)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (out,) = llm.chat(messages, params, tools=tools, use_tqdm=False)
    want = reference("v3").encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content="Weather in Paris?")], tools=[Tool.from_openai(tools[0])])
    )
    assert out.prompt_token_ids == want.tokens and llm.tokenizer.special_id("[AVAILABLE_TOOLS]") in want.tokens
    assert out.outputs[0].token_ids == hf_greedy(model, want.tokens, 6)
    opened = [*messages, {"role": "assistant", "content": "It is"}]
    (cont,) = llm.chat(opened, params, add_generation_prompt=False, continue_final_message=True, use_tqdm=False)
    want = reference("v3").encode_chat_completion(
        ChatCompletionRequest(
            messages=[UserMessage(content="Weather in Paris?"), AssistantMessage(content="It is", prefix=True)]
        )
    )
    assert cont.prompt_token_ids == want.tokens
    llm.shutdown()


def test_n_outputs_and_every_prompt_form(v1):
    folder, model = v1
    llm = LLM(folder, progress=False)
    ids = llm.tokenizer.encode("The capital of France is")
    (out,) = llm.generate(["The capital of France is"], SamplingParams(n=3, seed=9, max_tokens=5, logprobs=1))
    alone = [
        llm.generate([ids], SamplingParams(seed=9 + j, max_tokens=5, logprobs=1), use_tqdm=False)[0] for j in range(3)
    ]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [a.outputs[0].token_ids for a in alone]
    assert [c.cumulative_logprob for c in out.outputs] == pytest.approx(
        [a.outputs[0].cumulative_logprob for a in alone]
    )
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    forms = [ids, {"prompt_token_ids": ids}, {"prompt": "The capital of France is"}, "The capital of France is"]
    outs = llm.generate(forms, greedy, use_tqdm=False)
    assert [o.prompt for o in outs] == [None, None, "The capital of France is", "The capital of France is"]
    assert {tuple(o.outputs[0].token_ids) for o in outs} == {tuple(hf_greedy(model, ids, 4))}
    (single,) = llm.generate(ids, greedy, use_tqdm=False)  # a flat list of ids is one prompt, as in vLLM
    assert single.prompt_token_ids == ids
    for bad in ([{"text": "x"}], [3.5], []):
        with pytest.raises(InvalidRequestError):
            llm.generate(bad, greedy, use_tqdm=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError) as err:
        llm.generate(PROMPTS, greedy, use_tqdm=False, priority=[0, 0, 1, 0])
    assert err.value.param == "priority"
    llm.shutdown()


class _Bar:
    """A tqdm stand-in (vLLM's use_tqdm also takes the class to use): records what the bar is told."""

    made: list[_Bar] = []

    def __init__(self, *, total: int, **kwargs) -> None:
        self.total, self.n, self.kwargs, self.postfix, self.closed = total, 0, kwargs, "", False
        _Bar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        self.closed = True


def test_progress_bar_counts_prompts(v1):
    folder, _ = v1
    llm = LLM(folder, progress=False)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=3, n=2), use_tqdm=_Bar)
    (bar,) = _Bar.made
    assert len(outs) == 4 and (bar.total, bar.n, bar.closed) == (4, 4, True)
    assert bar.kwargs["desc"] == "Processed prompts" and bar.postfix.startswith("est. speed input: ")
    llm.generate(PROMPTS, SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(_Bar.made) == 1
    llm.shutdown()
