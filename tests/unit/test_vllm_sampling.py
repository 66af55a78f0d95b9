"""vLLM's per-request sampling extensions in the engine, offline (W = 0), each against its vLLM meaning computed
independently: transformers' logits (greedy with the masks vLLM applies: allowed_token_ids, bad_words), sentencepiece
for the text (stop strings and tokens kept with include_stop_str_in_output, special tokens kept), prompt truncation
(the last k tokens), cache_salt (only requests with the same salt share prefix-cache blocks) and each logprob's rank
among all tokens."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import sentencepiece as spm
import torch

from cluster import LLM, SamplingParams
from cluster.engine.request import CompletionOutput
from cluster.errors import InvalidRequestError, SamplingParamsError
from tests.helpers import hf_greedy, hf_logits, hf_mixtral
from tests.tokenizer_refs import DATA, FILES

PROMPT = [1, 415, 2936, 9060, 285, 1142, 10575, 754]
SP = spm.SentencePieceProcessor(model_file=str(DATA / FILES["v1"]))  # the model folder's tokenizer.model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm_sampling")
    model = hf_mixtral(folder, seed=31)
    llm = LLM(folder, progress=False, dtype="float32", attention_backend="sdpa")
    yield model, llm
    llm.shutdown()


def run(llm: LLM, prompt: list[int], **params) -> CompletionOutput:
    (out,) = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)
    return out.outputs[0]


def masked_greedy(model, prompt: list[int], n: int, *, allowed=None, bad: Sequence[list[int]] = ()) -> list[int]:
    """transformers' greedy tokens with vLLM's masks: only ``allowed`` tokens; a bad word's last token whenever the
    tokens before it were just generated."""
    out: list[int] = []
    for _ in range(n):
        logits = hf_logits(model, prompt + out)[-1].clone()
        if allowed is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[allowed] = 0
            logits += keep
        for word in bad:
            if len(word) - 1 <= len(out) and out[len(out) - len(word) + 1 :] == word[:-1]:
                logits[word[-1]] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def test_allowed_token_ids_restrict_every_token(setup):
    model, llm = setup
    allowed = [330, 1014, 2000, 5000, 28723]
    sampled = run(llm, PROMPT, max_tokens=24, temperature=1.0, seed=5, ignore_eos=True, allowed_token_ids=allowed)
    assert len(sampled.token_ids) == 24 and set(sampled.token_ids) <= set(allowed)
    greedy = run(llm, PROMPT, max_tokens=8, temperature=0, ignore_eos=True, allowed_token_ids=allowed)
    assert greedy.token_ids == masked_greedy(model, PROMPT, 8, allowed=allowed)


def test_bad_words_mask_the_last_token_after_the_rest(setup):
    """A one-token word never comes; a two-token word's second token never follows its first."""
    model, llm = setup
    ref = hf_greedy(model, PROMPT, 10)
    one = SP.decode([ref[0]])
    two_at = next(k for k in range(1, 8) if SP.encode(SP.decode(ref[k : k + 2])) == ref[k : k + 2])
    two = SP.decode(ref[two_at : two_at + 2])
    for words in ([one], [two], [one, two]):
        seqs = [s for w in words for s in _vllm_word_tokens(w)]
        out = run(llm, PROMPT, max_tokens=10, temperature=0, ignore_eos=True, bad_words=words)
        assert out.token_ids == masked_greedy(model, PROMPT, 10, bad=seqs), words
        assert out.token_ids != ref


def _vllm_word_tokens(word: str) -> list[list[int]]:
    """vLLM's tokenization of a bad word (SamplingParams.update_from_tokenizer), on sentencepiece itself."""
    plain = SP.encode(word.lstrip())
    spaced = SP.encode(" " + word.lstrip())
    return [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])


def test_include_stop_str_in_output_keeps_the_stop_string_and_token(setup):
    model, llm = setup
    ref = hf_greedy(model, PROMPT, 16)
    text = SP.decode(ref)
    k = next(k for k in range(4, len(text) - 3) if text.find(text[k : k + 3]) == k and text[k] != " ")
    stop = text[k : k + 3]
    cut = run(llm, PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    kept = run(llm, PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (text[:k], "stop", stop)
    assert (kept.text, kept.finish_reason, kept.stop_reason) == (text[: k + 3], "stop", stop)
    j = next(j for j in range(3, 16) if ref[j] not in ref[:j])
    cut = run(llm, PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[ref[j]])
    kept = run(
        llm,
        PROMPT,
        max_tokens=16,
        temperature=0,
        ignore_eos=True,
        stop_token_ids=[ref[j]],
        include_stop_str_in_output=True,
    )
    assert cut.token_ids == kept.token_ids == ref[: j + 1]
    assert (cut.text, cut.stop_reason) == (SP.decode(ref[:j]), ref[j])
    assert (kept.text, kept.stop_reason) == (SP.decode(ref[: j + 1]), ref[j])


def _vllm_decode(ids: list[int], spaces: bool) -> str:
    parts, run_ids = [], []
    for i in ids:
        if SP.is_control(i):
            parts += [SP.decode(run_ids)] if run_ids else []
            parts.append(SP.id_to_piece(i))
            run_ids = []
        else:
            run_ids.append(i)
    parts += [SP.decode(run_ids)] if run_ids else []
    return (" " if spaces else "").join(parts)


def test_skip_special_tokens_false_keeps_them_in_the_text(setup):
    _, llm = setup
    base = dict(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=[2, 415, 2936, 1014])
    skipped = run(llm, PROMPT, **base)
    assert 2 in skipped.token_ids and skipped.text == SP.decode(skipped.token_ids)
    for spaces in (True, False):
        kept = run(llm, PROMPT, **base, skip_special_tokens=False, spaces_between_special_tokens=spaces)
        assert kept.token_ids == skipped.token_ids
        assert kept.text == _vllm_decode(kept.token_ids, spaces) and "</s>" in kept.text


def test_truncate_prompt_tokens_keeps_the_last_tokens(setup):
    model, llm = setup
    long = PROMPT + list(range(3000, 3012))
    (out,) = llm.generate([long], SamplingParams(max_tokens=6, temperature=0, truncate_prompt_tokens=7), use_tqdm=False)
    assert out.prompt_token_ids == long[-7:]
    assert out.outputs[0].token_ids == hf_greedy(model, long[-7:], 6)
    (whole,) = llm.generate([long], SamplingParams(max_tokens=6, temperature=0, truncate_prompt_tokens=-1))
    assert whole.prompt_token_ids == long


def test_cache_salt_separates_the_prefix_cache(setup):
    """Prefix caching is on: a repeated prompt reuses its full blocks (16 positions each), but only under the same
    salt; the tokens never change."""
    _, llm = setup
    prompt = [1, *range(4000, 4040)]

    def cached(salt: str | None) -> tuple[int | None, list[int]]:
        (out,) = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, cache_salt=salt), use_tqdm=False)
        return out.num_cached_tokens, out.outputs[0].token_ids

    first = cached(None)
    assert first[0] == 0 and cached(None) == (32, first[1])
    assert cached("tenant-a") == (0, first[1])
    assert cached("tenant-a") == (32, first[1])
    assert cached("tenant-b") == (0, first[1])


def test_logprobs_in_vllms_shape_with_rank(setup):
    model, llm = setup
    out = run(llm, PROMPT, max_tokens=6, temperature=1.0, seed=11, ignore_eos=True, logprobs=3)
    ids = out.token_ids
    ref = torch.log_softmax(hf_logits(model, PROMPT + ids[:-1])[len(PROMPT) - 1 :].double(), dim=-1)
    total = 0.0
    for j, (tok, entry) in enumerate(zip(ids, out.logprobs, strict=True)):
        top = ref[j].topk(3).indices.tolist()
        assert list(entry)[0] == tok and set(entry) == {tok, *top}
        chosen = entry[tok]
        assert abs(chosen.logprob - ref[j, tok].item()) < 1e-4
        assert chosen.rank == 1 + int((ref[j] > ref[j, tok]).sum())
        assert chosen.decoded_token == _piece_text(tok)
        assert [entry[t].rank for t in top] == [1, 2, 3]
        total += chosen.logprob
    assert out.cumulative_logprob == pytest.approx(total)


def _piece_text(tok: int) -> str:
    """A token's text as OpenAI and vLLM report it: a byte piece as its character, the word marker as a space."""
    piece = SP.id_to_piece(tok)
    return bytes([int(piece[3:5], 16)]).decode(errors="replace") if SP.is_byte(tok) else piece.replace("\u2581", " ")


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ],
)
def test_bad_values_name_the_parameter(params, param):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**params)
    assert err.value.param == param


def test_allowed_token_ids_outside_the_vocabulary(setup):
    _, llm = setup
    with pytest.raises(InvalidRequestError) as err:
        llm.generate([PROMPT], SamplingParams(allowed_token_ids=[32000]), use_tqdm=False)
    assert err.value.param == "allowed_token_ids"
