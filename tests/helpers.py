"""Shared test helpers: checkpoints made by transformers itself, the independent reference."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

RAY_CPUS = 16  # logical CPUs: more actors than the 2 physical cores, as in CI
RAY_GPUS = 4  # logical GPUs so placement across GPUs is testable on a CPU machine


def ensure_local_ray():
    import ray

    from cluster.serve.grpc_bind import GRPC_HOST_ENV, HOOK

    if not ray.is_initialized():
        ray.init(
            address="local",  # a new instance even if a `ray start` cluster runs on this machine
            num_cpus=RAY_CPUS,
            num_gpus=RAY_GPUS,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            # as `mixserve serve` starts Ray: Serve's gRPC proxy binds 127.0.0.1, not every interface
            runtime_env={"worker_process_setup_hook": HOOK, "env_vars": {GRPC_HOST_ENV: "127.0.0.1"}},
        )
    return ray


T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    message: str,
    timeout_s: float = 30.0,
    interval_s: float = 0.1,
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``condition()`` until it returns something true and return that; fail with ``message`` after
    ``timeout_s``. An exception of a type in ``ignore`` counts as "not yet" (a server still starting, a worker still
    restarting)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            value = condition()
            if value:
                return value
            last = value
        except ignore as e:
            last = e
        assert time.monotonic() < deadline, f"{message} (within {timeout_s:g} s; last: {last!r})"
        time.sleep(interval_s)


def hf_mixtral(
    folder: Path,
    *,
    seed: int = 0,
    shard_size: str | None = None,
    v4_config: bool = False,
    classifier: bool = False,
    **overrides,
):
    """Make a random transformers ``MixtralForCausalLM`` (``MixtralForSequenceClassification`` with
    ``classifier``: pass ``num_labels`` / ``id2label`` / ``pad_token_id`` in ``overrides``), save it with
    ``save_pretrained`` into ``folder`` (plus the default tokenizer), and return the model in eval mode, float32."""
    import shutil

    from transformers import MixtralConfig, MixtralForCausalLM, MixtralForSequenceClassification

    from cluster.text.tokenizer import default_model_file

    kw = dict(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=None,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    kw.update(overrides)
    attn = kw.pop("attn_implementation")
    config = MixtralConfig(**kw)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = (MixtralForSequenceClassification if classifier else MixtralForCausalLM)(config).eval()
    # Non-trivial norms so a wrong norm weight would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if shard_size:
            model.save_pretrained(folder, max_shard_size=shard_size)
        else:
            model.save_pretrained(folder)
    shutil.copyfile(default_model_file(), folder / "tokenizer.model")
    if v4_config:
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["transformers_version"] = "4.46.0"
        (folder / "config.json").write_text(json.dumps(cfg))
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_routed(model, ids: list[int]) -> Any:
    """[T, L, K]: transformers' top-k experts per token and layer (softmax over the router logits, top k)."""
    import numpy as np

    with torch.no_grad():
        logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # L x [T, E]
    k = model.config.num_experts_per_tok
    return np.stack([torch.softmax(x.float(), -1).topk(k, -1).indices.numpy() for x in logits], axis=1)


# Largest |logits - reference| with both sides in the same dtype (tiny models, logits of magnitude ~1): fp32 agrees to
# rounding; bf16 keeps 8 bits of mantissa, so one rounding step at 1.0 is 2**-8 ~ 0.004 and a few of them add up.
LOGITS_TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}


def assert_greedy_follows(model, prompt: list[int], tokens: list[int], *, margin: float) -> None:
    """Greedy ``tokens`` after ``prompt`` are what the reference ``model`` picks at every position given the same
    prefix (teacher-forced), except where its best two logits are within ``margin`` (a near-tie either side of a
    rounding step may break either way)."""
    logits = hf_logits(model, prompt + tokens[:-1])[len(prompt) - 1 :]  # [len(tokens), V]: row j predicts tokens[j]
    top2 = logits.topk(2, dim=-1)
    for j, tok in enumerate(tokens):
        best, second = top2.values[j].tolist()
        if best - second >= margin:
            assert tok == int(top2.indices[j, 0]), f"token {j}: {tok}, the reference picks {int(top2.indices[j, 0])}"


def listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp and tcp6 ("0.0.0.0", "::", "127.0.0.1", ...)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            if width == 32 and address.upper().startswith("0000000000000000FFFF0000"):  # ::ffff:a.b.c.d
                width, address = 8, address[-8:]
            if width == 8:
                found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
            else:
                found.add("::" if int(address, 16) == 0 else address)
    return found


# A JSON schema for the structured-output tests; bounded, so that a random model finishes well within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
