"""What every request handler (HTTP routes, gRPC methods) of one ingress replica shares, and the CPU work done for
them off the event loop: parsing large bodies, tokenizing and detokenizing run in a small thread pool, so that one
large request never stalls the other routes (``/health`` included); sentencepiece releases the GIL while it works.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cluster.config.serving import AppArgs
from cluster.serve.ingress.auth import ApiKeys
from cluster.serve.ingress.body import check_prompt_chars
from cluster.serve.ingress.health import HealthMonitor
from cluster.serve.ingress.metrics import ServeMetrics
from cluster.serve.ingress.streams import FrontendClient
from cluster.text.chat_template import ChatOptions
from cluster.text.tokenizer import Tokenizer

T = TypeVar("T")
CPU_THREADS = 2


def chat_chars(chat: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """The characters of a chat's text: contents, tool-call arguments and the tools' JSON."""
    total = len(json.dumps(tools, ensure_ascii=False)) if tools else 0
    for m in chat:
        total += len(m.get("content") or "")
        for call in m.get("tool_calls") or ():
            total += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return total


@dataclass
class ServeContext:
    args: AppArgs
    tokenizer: Tokenizer
    frontend: FrontendClient
    metrics: ServeMetrics
    keys: ApiKeys
    health: HealthMonitor
    created: int  # when this replica started: the ``created`` of the served model cards
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=CPU_THREADS, thread_name_prefix="mixserve-cpu")
    )

    @property
    def model_name(self) -> str:
        """The name responses report (the first served model name)."""
        return self.args.model_name

    @property
    def model_names(self) -> list[str]:
        return self.args.serving.served_model_name

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the CPU pool, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def encode(self, text: str, *, param: str = "prompt", bos: bool = True) -> list[int]:
        """Token ids of a prompt; one too long to fit the context is refused before it is tokenized."""
        check_prompt_chars(len(text), await self.frontend.max_model_len(), param)
        return await self.offload(self.tokenizer.encode, text, bos)

    async def encode_chat(
        self,
        chat: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        options: ChatOptions | None = None,
        param: str = "messages",
    ) -> list[int]:
        """Token ids of a chat (and the tools it offers) in the model's format, rendered with ``options`` (vLLM's
        chat template fields); ChatFormatError: 400 on ``messages``, ``tools`` or the option at fault."""
        documents = json.dumps(options.documents) if options is not None and options.documents else ""
        check_prompt_chars(chat_chars(chat, tools) + len(documents), await self.frontend.max_model_len(), param)
        return await self.offload(functools.partial(self.tokenizer.encode_chat, chat, tools=tools, options=options))

    async def decode(self, ids: list[int]) -> str:
        return await self.offload(self.tokenizer.decode, ids)
