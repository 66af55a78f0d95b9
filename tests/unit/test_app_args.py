"""Serve application arguments: bad values fail the deploy with a message naming the field."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from cluster import LLM, SamplingParams
from cluster.checkpoint.tiny_model import TinyModelSpec, write_tiny_model
from cluster.config.options import options_from
from cluster.config.serving import AppArgs, parse_args
from cluster.config.transports import NAMES, TRANSPORTS
from cluster.errors import AppArgsError
from cluster.serve.cli import add_serve_command, ray_runtime_env, startup_warnings
from cluster.serve.grpc_bind import grpc_address

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_args_are_valid():
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    args = parse_args(config["applications"][0]["args"])
    assert args.parallel.expert_workers == 2 and args.load.model is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"expert_workers": -1}, "expert_workers"),
        ({"dtype": "int8"}, "dtype"),
        ({"placement_strategy": "EVERYWHERE"}, "placement_strategy"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": 64, "max_num_batched_tokens": 32}, "max_num_batched_tokens"),
        ({"served_model_name": ""}, "served_model_name"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"modle": "/x"}, "modle"),
        ({"transport": "gloo"}, "transport"),
    ],
)
def test_bad_args_name_the_field(args, needle):
    with pytest.raises(AppArgsError, match=needle):
        parse_args(args)


def test_offline_generate_takes_more_prompts_than_the_queue(tmp_path):
    folder = write_tiny_model(tmp_path, TinyModelSpec(hidden=32, intermediate=64, layers=1, experts=4))
    llm = LLM(folder, max_num_seqs=2, max_num_batched_tokens=16, max_queued_requests=1, progress=False)
    outs = llm.generate([[1, 5 + i] for i in range(7)], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [3] * 7


def test_serving_args_take_one_or_many_values():
    a = parse_args({"api_key": "k", "served_model_name": "m"})
    assert a.serving.api_key == ["k"] and a.serving.served_model_name == ["m"] and a.model_name == "m"
    a = parse_args({"served_model_name": ["m", "alias"], "cors_allowed_origins": ["*"], "api_key": None})
    assert a.model_name == "m" and a.serving.cors_allowed_origins == ["*"] and a.serving.api_key == []
    d = parse_args(None)
    assert d.serving.api_key == [] and d.serving.api_key_env == "MIXSERVE_API_KEY" and d.serving.api_key_file is None
    assert d.serving.cors_allowed_origins == [] and d.serving.max_request_bytes == 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"api_key": "two words"}, "api_key"),
        ({"api_key": [" padded"]}, "api_key"),
        ({"api_key": [""]}, "api_key"),
        ({"served_model_name": []}, "served_model_name"),
        ({"cors_allowed_origins": [""]}, "cors_allowed_origins"),
        ({"max_request_bytes": 100}, "max_request_bytes"),
        ({"api_key_fil": "/x"}, "api_key_fil"),
    ],
)
def test_bad_serving_args_name_the_field(args, needle):
    with pytest.raises(AppArgsError, match=needle):
        parse_args(args)


def test_serve_flags_for_list_fields():
    p = argparse.ArgumentParser()
    add_serve_command(p.add_subparsers())
    skip = ("expert_placement",)
    ns = p.parse_args(["serve", "--api-key", "a", "b", "--api-key", "c", "--served-model-name", "m", "alias"])
    args = options_from(ns, AppArgs, skip=skip)
    assert args["api_key"] == ["a", "b", "c"] and args["served_model_name"] == ["m", "alias"]
    assert parse_args(args).model_name == "m"
    defaults = options_from(p.parse_args(["serve"]), AppArgs, skip=skip)
    assert "api_key" not in defaults and "served_model_name" not in defaults  # the config's own defaults apply
    assert parse_args(defaults).serving.served_model_name == ["mixserve-tiny"]
    ns = p.parse_args(["serve", "--cors-allowed-origins", "https://a.example", "--max-request-bytes", "2048"])
    assert options_from(ns, AppArgs, skip=skip)["cors_allowed_origins"] == ["https://a.example"]


def test_startup_warnings_say_what_is_exposed():
    assert startup_warnings("127.0.0.1", 9000, api_keys=0) == []  # HTTP and gRPC on loopback only
    assert startup_warnings("0.0.0.0", 9000, api_keys=2) == []  # everything bound everywhere, with keys
    open_http = startup_warnings("0.0.0.0", 0, api_keys=0)
    assert len(open_http) == 1 and "no API key: anyone who reaches HTTP on every interface" in open_http[0]
    both = startup_warnings("10.0.0.5", 9000, api_keys=0)
    assert len(both) == 1 and "HTTP and gRPC on 10.0.0.5" in both[0]
    joining = startup_warnings("127.0.0.1", 9000, api_keys=1, joining=True)
    assert len(joining) == 1 and "keeps the address it was started with" in joining[0]
    assert startup_warnings("127.0.0.1", 0, api_keys=1, joining=True) == []


def test_ray_runtime_env_binds_grpc_to_the_host():
    assert ray_runtime_env("127.0.0.1") == {
        "worker_process_setup_hook": "cluster.serve.grpc_bind.bind_grpc_host",
        "env_vars": {"MIXSERVE_GRPC_HOST": "127.0.0.1"},
    }
    assert ray_runtime_env("0.0.0.0") == {}
    assert grpc_address("127.0.0.1", "[::]:9000") == "127.0.0.1:9000"
    assert grpc_address("::1", "[::]:9000") == "[::1]:9000"


def test_frontend_cpus_size_the_frontend_replica():
    from cluster.serve.app import build_app

    def frontend_options(app) -> dict:
        ingress = app._bound_deployment  # the ingress deployment, bound to the frontend's
        (frontend,) = [a for a in ingress.init_args if hasattr(a, "_bound_deployment")]
        return frontend._bound_deployment.ray_actor_options

    assert frontend_options(build_app({}))["num_cpus"] == 1
    assert frontend_options(build_app({"frontend_cpus": 4, "cpus_per_worker": 2}))["num_cpus"] == 4
    assert parse_args({"cpus_per_worker": 2}).cluster_config().parallel.cpus_per_worker == 2


@pytest.mark.parametrize("name", NAMES)
def test_serve_takes_every_transport_the_registry_allows_in_serve(name):
    spec = TRANSPORTS[name]
    if spec.serve:
        assert parse_args({"transport": name}).parallel.transport == name
    else:
        with pytest.raises(AppArgsError, match=f"transport: {name} is not available in Serve") as err:
            parse_args({"transport": name})
        assert spec.why_not_serve in str(err.value)
    assert parse_args({}).parallel.transport == "object_ref"
    with pytest.raises(AppArgsError, match="transport: Value error, unknown transport 'pigeon'"):
        parse_args({"transport": "pigeon"})
