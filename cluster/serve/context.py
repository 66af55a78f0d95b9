"""What every request handler (HTTP routes, gRPC methods) of one ingress replica shares."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.serve.args import AppArgs
from cluster.serve.metrics import ServeMetrics
from cluster.serve.streams import FrontendClient
from cluster.tokenizer import Tokenizer


@dataclass
class ServeContext:
    args: AppArgs
    tokenizer: Tokenizer
    frontend: FrontendClient
    metrics: ServeMetrics
    created: int  # when this replica started: the ``created`` of the served model card

    @property
    def model_name(self) -> str:
        return self.args.served_model_name
