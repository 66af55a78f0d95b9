"""What a request must satisfy before the engine queues it (:func:`check`): a generation against the model's head,
vocabulary, context length and KV cache; a pooling request (``cluster.engine.pooling``) likewise. Each error names
the request field at fault."""

from __future__ import annotations

from typing import Protocol

from cluster.engine.pooling import PoolingParams
from cluster.engine.request import Params
from cluster.engine.sampling import SamplingParams
from cluster.engine.scheduler import Scheduler
from cluster.errors import InvalidRequestError, PromptTooLongError


class Limits(Protocol):
    """What the checks read of ``cluster.engine.core.EngineCore``."""

    max_model_len: int
    vocab_size: int
    num_labels: int
    scheduler: Scheduler


def check(core: Limits, prompt_token_ids: list[int], params: Params) -> None:
    if isinstance(params, PoolingParams):
        check_pooling(core, prompt_token_ids, params)
    else:
        check_generation(core, prompt_token_ids, params)


def check_generation(core: Limits, prompt_token_ids: list[int], params: SamplingParams) -> None:
    if core.num_labels:
        raise InvalidRequestError(
            "this model is a sequence classifier (MixtralForSequenceClassification): it has a score head, no "
            "lm_head, and cannot generate text; classify or embed with it instead",
            param="model",
        )
    if params.candidates != 1:
        raise InvalidRequestError(
            f"one engine request is one choice: expand n={params.n} / best_of={params.best_of} with "
            "cluster.engine.fanout first",
            param="n",
        )
    if not prompt_token_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    prompt_token_ids = params.truncated(prompt_token_ids, core.max_model_len)
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < core.vocab_size for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {core.vocab_size})", param="prompt")
    if any(t >= core.vocab_size for t, _ in params.bias):
        raise InvalidRequestError(f"logit_bias token ids must be below {core.vocab_size}", param="logit_bias")
    if any(t >= core.vocab_size for t in params.allowed_token_ids or ()):
        raise InvalidRequestError(
            f"allowed_token_ids must be token ids below {core.vocab_size}", param="allowed_token_ids"
        )
    total = len(prompt_token_ids) + params.max_tokens
    if total > core.max_model_len:
        raise PromptTooLongError(
            f"this model's maximum context length is {core.max_model_len} tokens; the prompt has "
            f"{len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens} ({total} in all)",
            param="max_tokens" if len(prompt_token_ids) < core.max_model_len else "prompt",
        )
    need = core.scheduler.blocks_needed(total)
    if need > core.scheduler.pool.num_blocks:
        bs = core.scheduler.block_size
        raise PromptTooLongError(
            f"the KV cache holds {core.scheduler.pool.num_blocks * bs} positions; the prompt and max_tokens "
            f"need {need * bs}",
            param="max_tokens",
        )


def check_pooling(core: Limits, prompt_token_ids: list[int], params: PoolingParams) -> None:
    if params.task == "classify" and not core.num_labels:
        raise InvalidRequestError(
            "this model has no classification head (it is a causal LM); classify needs a "
            "MixtralForSequenceClassification checkpoint",
            param="model",
        )
    prompt = params.truncated(list(prompt_token_ids), core.max_model_len)
    if not prompt:
        raise InvalidRequestError("the input is empty", param="input")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < core.vocab_size for t in prompt):
        raise InvalidRequestError(f"input token ids must be integers in [0, {core.vocab_size})", param="input")
    if len(prompt) > core.max_model_len:
        raise PromptTooLongError(
            f"this model's maximum context length is {core.max_model_len} tokens; the input has {len(prompt)}",
            param="input",
        )
    if core.scheduler.blocks_needed(len(prompt)) > core.scheduler.pool.num_blocks:
        raise PromptTooLongError(
            f"the KV cache holds {core.scheduler.pool.num_blocks * core.scheduler.block_size} positions; the "
            f"input has {len(prompt)} tokens",
            param="input",
        )
