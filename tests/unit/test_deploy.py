"""Deployment files: deploy/serve_config.yaml, deploy/kuberay/rayservice.yaml, deploy/Dockerfile, .dockerignore.

No Ray cluster, no Kubernetes and no Docker: the Serve config is checked with Ray Serve's own schema
(ServeDeploySchema, plus a strict unknown-key walk because that schema ignores extra keys for forward compatibility),
the application ``args`` with the application's own parser (``cluster.serve.app.parse_args``, the single source of
their names and limits: nothing is re-declared here), and the RayService with a small OpenAPI v3 walker over KubeRay's
CRD.

Both Serve configs hold two applications: ``mixserve-pool`` (``build_pool_app``: the ExpertPool deployment alone, no
route) and ``mixserve`` (``build_app``: the API, whose frontends attach to that pool through ``expert_pool``), so a
redeploy of ``mixserve`` with changed args keeps the workers loaded. The pool application's args must agree with the
main application's on what a frontend and its pool must match (``cluster.runtime.pool_owner.MUST_MATCH``).
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from ray.serve.schema import ServeDeploySchema

from cluster.config.load import LoadConfig
from cluster.config.parallel import ParallelConfig
from cluster.config.serving import AppArgs
from cluster.errors import AppArgsError
from cluster.runtime.pool_owner import MUST_MATCH, mismatch, pool_options
from cluster.serve.app import parse_args

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
KUBERNETES_MD = REPO / "deploy" / "KUBERNETES.md"

# The RayService CRD (KubeRay's config/crd/bases/ray.io_rayservices.yaml). First hit wins.
CRD_CANDIDATES = [
    os.environ.get("MIXSERVE_RAYSERVICE_CRD", ""),
    str(REPO / "deploy" / "kuberay" / "crd" / "ray.io_rayservices.yaml"),
    "/work/shared/reference/kuberay-ray.io_rayservices.yaml",
]

APP_NAME = "mixserve"
IMPORT_PATH = "cluster.serve.app:build_app"
POOL_APP_NAME = "mixserve-pool"  # the expert pool's own application (the name `mixserve serve` gives it too)
POOL_IMPORT_PATH = "cluster.serve.app:build_pool_app"
# name -> (import_path, route_prefix), in the files' order: the pool first, then the API. The pool has no route.
APPS = {POOL_APP_NAME: (POOL_IMPORT_PATH, None), APP_NAME: (IMPORT_PATH, "/")}
# Options only the pool's workers use (cluster/runtime/pool.py): in the main application they would be ignored.
POOL_ONLY = ("cpus_per_worker", "placement_strategy")
GRPC_SERVICER = "cluster.serve.proto.mixserve_pb2_grpc.add_GenerationServicer_to_server"
HTTP_PORT = 8000
GRPC_PORT = 9000


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------------
# loaders


def load_serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def load_rayservice() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    services = [d for d in docs if d.get("kind") == "RayService"]
    assert len(services) == 1, f"{RAYSERVICE}: expected exactly one RayService document"
    return services[0]


def rayservice_serve_config(rs: dict) -> dict:
    text = rs["spec"]["serveConfigV2"]
    assert isinstance(text, str), "spec.serveConfigV2 must be a YAML string (a block scalar: `serveConfigV2: |`)"
    return yaml.safe_load(text)


def load_crd_schema(version: str = "v1") -> dict:
    for candidate in CRD_CANDIDATES:
        if candidate and Path(candidate).is_file():
            crd = yaml.safe_load(Path(candidate).read_text())
            break
    else:
        pytest.skip("RayService CRD not found; set MIXSERVE_RAYSERVICE_CRD to KubeRay's ray.io_rayservices.yaml")
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayService"
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", False), f"RayService {version} is not served by this CRD"
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"RayService CRD has no version {version}")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


# ---------------------------------------------------------------------------------------------------------------
# strict key check against Ray Serve's pydantic schema (ServeDeploySchema accepts and drops unknown keys)


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def unknown_serve_keys(model: type[BaseModel], data: dict, path: str = "") -> list[str]:
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    errors = []
    for key, value in data.items():
        where = f"{path}{key}"
        if key not in fields:
            errors.append(where)
            continue
        models = _models_in(fields[key].annotation)
        if len(models) != 1:
            continue  # a plain dict (e.g. `args`, `runtime_env`) or an ambiguous union: nothing to walk
        if isinstance(value, dict):
            errors += unknown_serve_keys(models[0], value, where + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    errors += unknown_serve_keys(models[0], item, f"{where}[{i}].")
    return errors


def validate_serve_config(cfg: dict) -> ServeDeploySchema:
    schema = ServeDeploySchema.model_validate(cfg)
    assert unknown_serve_keys(ServeDeploySchema, cfg) == [], "keys Ray Serve would silently ignore"
    return schema


# ---------------------------------------------------------------------------------------------------------------
# OpenAPI v3 (structural CRD schema) walker


SCALARS = {
    "string": lambda v: isinstance(v, str),
    "integer": _int,
    "number": _num,
    "boolean": lambda v: isinstance(v, bool),
}


def crd_errors(value, schema: dict, path: str = "") -> list[str]:
    """Every key path in ``value`` must exist in ``schema``; types, enums, patterns and required keys must hold.

    Honours ``x-kubernetes-preserve-unknown-fields`` (anything goes below, beyond the declared properties),
    ``x-kubernetes-int-or-string`` and ``additionalProperties`` (maps such as rayStartParams, labels, resources).
    """
    where = path or "<root>"
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _int(value)):
            return [f"{where}: expected an integer or a string, got {type(value).__name__}"]
        pattern = next((s.get("pattern") for s in [schema, *schema.get("anyOf", [])] if s.get("pattern")), None)
        if isinstance(value, str) and pattern and not re.match(pattern, value):
            return [f"{where}: {value!r} does not match {pattern}"]
        return []
    kind = schema.get("type")
    if kind is None and preserve:
        return []
    errors: list[str] = []
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if props is not None and key in props:
                errors += crd_errors(item, props[key], sub)
            elif isinstance(extra, dict):
                errors += crd_errors(item, extra, sub)
            elif preserve or extra is True:
                continue
            elif props is None and path == "metadata":
                continue  # the root ObjectMeta: validated by the API server itself, not by the CRD schema
            else:
                errors.append(f"{sub}: not in the CRD schema (the API server would prune it)")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: required key {key!r} is missing")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{where}: expected an array, got {type(value).__name__}"]
        for i, item in enumerate(value):
            errors += crd_errors(item, schema.get("items", {}), f"{path}[{i}]")
    elif kind in SCALARS and not SCALARS[kind](value):
        errors.append(f"{where}: expected {'an' if kind == 'integer' else 'a'} {kind}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if kind == "string" and isinstance(value, str) and schema.get("pattern") and not re.match(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    return errors


def key_paths(value, path: str = "") -> set[str]:
    """All key paths of a document, list indices dropped: spec.rayClusterConfig.headGroupSpec.rayStartParams..."""
    out: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            out.add(sub)
            out |= key_paths(item, sub)
    elif isinstance(value, list):
        for item in value:
            out |= key_paths(item, path)
    return out


# ---------------------------------------------------------------------------------------------------------------
# helpers for the Kubernetes objects


def ray_container(pod_template: dict) -> dict:
    # KubeRay treats the first container as the Ray container.
    return pod_template["spec"]["containers"][0]


def gpu_count(container: dict) -> float:
    resources = container.get("resources", {})
    limits = resources.get("limits", {})
    requests = resources.get("requests", {})
    if "nvidia.com/gpu" in requests or "nvidia.com/gpu" in limits:
        # Kubernetes extended resources: requests (when given) must equal limits.
        assert str(requests.get("nvidia.com/gpu", limits.get("nvidia.com/gpu"))) == str(limits.get("nvidia.com/gpu"))
    return float(str(limits.get("nvidia.com/gpu", 0)))


def app_of(cfg: dict, name: str = APP_NAME) -> dict:
    """The application ``name`` of a Serve config (default: the main one, ``mixserve``)."""
    apps = {a["name"]: a for a in cfg["applications"]}
    assert name in apps, f"no application {name!r} (have {sorted(apps)})"
    return apps[name]


def app_args(cfg: dict) -> AppArgs:
    """The main application's ``args``, parsed exactly as ``build_app`` parses them (AppArgsError names a bad
    field)."""
    return parse_args(app_of(cfg)["args"])


def pool_args(cfg: dict) -> AppArgs:
    """The pool application's ``args``, parsed exactly as ``build_pool_app`` parses them."""
    return parse_args(app_of(cfg, POOL_APP_NAME)["args"])


def import_attr(import_path: str):
    """What Serve imports for an application's ``import_path`` (``module:attribute``)."""
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def both_configs() -> list[tuple[str, dict]]:
    return [(SERVE_CONFIG.name, load_serve_config()), ("serveConfigV2", rayservice_serve_config(load_rayservice()))]


# ---------------------------------------------------------------------------------------------------------------
# (a) serve_config.yaml


def test_serve_config_validates_with_ray_serve_schema():
    cfg = load_serve_config()
    schema = validate_serve_config(cfg)
    assert schema.proxy_location.value in {"EveryNode", "HeadOnly"}
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == HTTP_PORT
    assert schema.grpc_options.port == GRPC_PORT
    assert schema.grpc_options.grpc_servicer_functions == [GRPC_SERVICER]
    assert [a.name for a in schema.applications] == list(APPS)
    for app in schema.applications:
        assert (app.import_path, app.route_prefix) == APPS[app.name], app.name
    # route_prefix must be written `null`: left out, Serve's default is "/", which is the main application's
    assert app_of(cfg, POOL_APP_NAME)["route_prefix"] is None


def test_serve_config_args_are_the_tiny_default():
    cfg = load_serve_config()
    a = app_args(cfg)
    assert a.load.model is None  # null = the built-in tiny default model
    assert a.parallel.expert_workers == 2 and a.load.dtype == "float32"
    assert a.serving.served_model_name == ["mixserve-tiny"]
    assert a.parallel.gpus_per_worker is None  # auto: runs on a CPU-only machine
    assert a.parallel.expert_pool == POOL_APP_NAME
    pool = pool_args(cfg)  # the workers' own options live in the pool application
    assert pool.load.model is None and pool.load.dtype == "float32"
    assert pool.parallel.expert_workers == 2 and pool.parallel.gpus_per_worker is None
    assert pool.parallel.placement_strategy == "PACK" and pool.parallel.cpus_per_worker == 1
    assert (a.engine.max_num_seqs, a.engine.max_num_batched_tokens, a.engine.max_queued_requests) == (16, 512, 256)
    assert a.engine.max_model_len is None and a.serving.request_timeout_s == 120.0
    assert (
        a.serving.api_key == [] and a.serving.api_key_env == "MIXSERVE_API_KEY" and a.serving.api_key_file is None
    )  # no key inline


def test_both_files_autoscale_the_frontends_over_one_pool():
    for cfg in (load_serve_config(), rayservice_serve_config(load_rayservice())):
        a = app_args(cfg)
        scaling = a.serving.frontend_autoscaling
        assert scaling is not None and scaling.min_replicas == 1 < scaling.max_replicas == a.serving.max_frontends
        assert 0 < scaling.target_ongoing_requests <= a.engine.max_num_seqs  # a replica adds up before it queues
        assert a.parallel.transport == "object_ref"  # the one transport that shares a pool among frontends
        assert a.serving.ingress_replicas == 1 and a.serving.ingress_autoscaling is None
    # parsed by the application's own model: a typo or an inverted range fails the deploy naming it
    args = dict(app_of(load_serve_config())["args"])
    with pytest.raises(AppArgsError, match="max_replica"):
        parse_args({**args, "frontend_autoscaling": {"min_replicas": 1, "max_replica": 4}})
    with pytest.raises(AppArgsError, match="max_replicas"):
        parse_args({**args, "frontend_autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(AppArgsError, match="transport"):
        parse_args({**args, "transport": "channel"})  # channel cannot serve several frontends from one pool


def test_args_check_is_the_application_parser():
    # The checks above go through parse_args, so a misspelt or out-of-range arg in either file fails them.
    args = dict(app_of(load_serve_config())["args"])
    with pytest.raises(AppArgsError, match="expert_worker"):
        parse_args({**args, "expert_worker": 2})
    with pytest.raises(AppArgsError, match="max_num_seqs"):
        parse_args({**args, "max_num_seqs": 0})


def test_strict_key_walk_catches_typos():
    cfg = load_serve_config()
    cfg["grpc_options"] = dict(cfg["grpc_options"], grpc_servicer_function=["x.y"])
    main = [a["name"] for a in cfg["applications"]].index(APP_NAME)
    cfg["applications"][main] = dict(cfg["applications"][main], import_pth="a.b:c")
    ServeDeploySchema.model_validate(cfg)  # Ray Serve itself accepts (and drops) both misspelt keys
    assert unknown_serve_keys(ServeDeploySchema, cfg) == [
        "grpc_options.grpc_servicer_function",
        f"applications[{main}].import_pth",
    ]


# ---------------------------------------------------------------------------------------------------------------
# (a') the expert pool in an application of its own


def test_import_paths_exist():
    # What Serve imports for each application of either file, and what it gets: a builder of an Application.
    assert import_attr(IMPORT_PATH) is import_attr("cluster.serve.app:build_app")
    for _, cfg in both_configs():
        for app in cfg["applications"]:
            builder = import_attr(app["import_path"])
            assert callable(builder), app["import_path"]
    from cluster.serve.app import build_pool_app
    from cluster.serve.cli import POOL_APP

    assert import_attr(POOL_IMPORT_PATH) is build_pool_app
    assert POOL_APP == POOL_APP_NAME  # `mixserve serve` names its pool application as the files do


def test_both_files_build_the_pool_app_and_attach_the_main_app_to_it():
    from ray.serve import Application

    from cluster.serve.app import build_app, build_pool_app

    pool_fields = set(LoadConfig.model_fields) | set(ParallelConfig.model_fields)
    for where, cfg in both_configs():
        pool_raw = app_of(cfg, POOL_APP_NAME)["args"]
        main_raw = app_of(cfg)["args"]
        pool, main = pool_args(cfg), app_args(cfg)  # both parse (AppArgsError names a bad field)
        assert main.parallel.expert_pool == POOL_APP_NAME, f"{where}: the frontends must attach to the pool app"
        assert pool.parallel.expert_pool is None, f"{where}: the pool application owns its pool"
        assert pool.parallel.expert_workers >= 1  # build_pool_app refuses 0
        # the pool app takes only what a pool is made of (load and parallel options): anything else would be ignored
        assert set(pool_raw) <= pool_fields, f"{where}: not pool options: {sorted(set(pool_raw) - pool_fields)}"
        assert not set(POOL_ONLY) & set(main_raw), f"{where}: worker options belong to {POOL_APP_NAME}"
        # what a frontend and its pool must agree on (else the frontends refuse to start, naming the option)
        pool_opts, main_opts = pool_options(pool.cluster_config()), pool_options(main.cluster_config())
        for key in MUST_MATCH:
            assert pool_opts[key] == main_opts[key], f"{where}: {key} differs between the two applications"
        assert mismatch(pool_opts, main_opts) is None
        # and every option both give (dtype, gpus_per_worker, ...) is given the same value
        shared = set(pool_raw) & set(main_raw)
        assert {"model", "dtype", "expert_workers"} <= shared
        assert {k: pool_raw[k] for k in shared} == {k: main_raw[k] for k in shared}, where
        # the builders accept the args as they are (no Ray needed to build)
        assert isinstance(build_pool_app(pool_raw), Application)
        assert isinstance(build_app(main_raw), Application)
    # a pool that does not match is named by the check the pool runs when a frontend attaches
    cfg = load_serve_config()
    other = parse_args({**app_of(cfg, POOL_APP_NAME)["args"], "expert_workers": 4})
    why = mismatch(pool_options(other.cluster_config()), pool_options(app_args(cfg).cluster_config()))
    assert why is not None and why.startswith("expert_workers:")


# ---------------------------------------------------------------------------------------------------------------
# (b) the RayService's serveConfigV2 is the same application


def test_rayservice_serve_config_validates_and_matches_serve_config():
    local = load_serve_config()
    k8s = rayservice_serve_config(load_rayservice())
    validate_serve_config(k8s)

    assert [a["name"] for a in k8s["applications"]] == [a["name"] for a in local["applications"]] == list(APPS)
    for name, (import_path, route_prefix) in APPS.items():
        a, b = app_of(local, name), app_of(k8s, name)
        assert b["import_path"] == a["import_path"] == import_path, name
        assert b["route_prefix"] == a["route_prefix"] == route_prefix, name
        assert set(b.get("args", {})) == set(a.get("args", {})), f"{name}: the two files must pass the same args"
        assert set(b) == set(a), f"{name}: same application-level keys (runtime_env, deployments, ...)"
    assert app_of(k8s)["args"]["expert_pool"] == app_of(local)["args"]["expert_pool"] == POOL_APP_NAME

    assert k8s["grpc_options"]["grpc_servicer_functions"] == local["grpc_options"]["grpc_servicer_functions"]
    assert k8s["grpc_options"]["port"] == local["grpc_options"]["port"] == GRPC_PORT
    assert k8s["http_options"]["port"] == local["http_options"]["port"] == HTTP_PORT
    assert k8s["proxy_location"] == local["proxy_location"]
    # Intentional difference: inside a pod the proxies must listen on all interfaces.
    assert k8s["http_options"]["host"] == "0.0.0.0"


def test_rayservice_args_are_mixtral_8x7b():
    cfg = rayservice_serve_config(load_rayservice())
    a = app_args(cfg)
    assert a.load.model == "/models/Mixtral-8x7B-Instruct-v0.1"
    assert a.load.dtype == "bfloat16" and a.parallel.expert_workers == 4 and a.parallel.gpus_per_worker == 1
    assert 8 % a.parallel.expert_workers == 0, "Mixtral has 8 experts per layer"
    assert a.serving.served_model_name == ["mixtral-8x7b-instruct"]
    assert (a.engine.max_num_seqs, a.engine.max_num_batched_tokens, a.engine.max_model_len) == (32, 2048, 8192)
    assert a.parallel.expert_pool == POOL_APP_NAME
    pool = pool_args(cfg)
    assert pool.load.model == a.load.model and pool.load.dtype == "bfloat16"
    assert pool.parallel.expert_workers == 4 and pool.parallel.gpus_per_worker == 1


# ---------------------------------------------------------------------------------------------------------------
# (c) the RayService against the CRD


def test_rayservice_keys_exist_in_crd():
    rs = load_rayservice()
    schema = load_crd_schema(rs["apiVersion"].split("/", 1)[1])
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    errors = crd_errors(rs, schema)
    assert errors == [], "\n".join(errors)
    # The paths this deployment relies on are there (and therefore were checked above).
    paths = key_paths(rs)
    for needed in [
        "spec.serveConfigV2",
        "spec.upgradeStrategy.type",
        "spec.rayClusterConfig.rayVersion",
        "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus",
        "spec.rayClusterConfig.headGroupSpec.template.spec.containers.ports.containerPort",
        "spec.rayClusterConfig.workerGroupSpecs.groupName",
        "spec.rayClusterConfig.workerGroupSpecs.template.spec.containers.resources.limits.nvidia.com/gpu",
        "spec.rayClusterConfig.workerGroupSpecs.template.spec.volumes.persistentVolumeClaim.claimName",
    ]:
        assert needed in paths, needed


def test_crd_walker_rejects_bad_keys_and_types():
    schema = load_crd_schema()
    rs = load_rayservice()
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    bad = {
        **rs,
        "spec": {
            **rs["spec"],
            "serveConfig": "typo",  # v1alpha1-era name, not in v1
            "rayClusterConfig": {
                **rs["spec"]["rayClusterConfig"],
                "headGroupSpec": {**head, "rayStartParams": {"num-cpus": 0}},  # must be a string
            },
        },
    }
    errors = crd_errors(bad, schema)
    assert any(e.startswith("spec.serveConfig:") for e in errors)
    assert any(e.startswith("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus:") for e in errors)
    quantity = {"type": "object", "additionalProperties": {"x-kubernetes-int-or-string": True, "pattern": r"^[0-9]+$"}}
    assert crd_errors({"cpu": "4x"}, quantity) and not crd_errors({"cpu": "4", "nvidia.com/gpu": 5}, quantity)


def test_crd_walker_preserve_unknown_fields():
    # Some CRDs (and KubeRay with trimmed pod templates) mark the pod template as preserve-unknown-fields.
    schema = {
        "type": "object",
        "properties": {
            "template": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "partial": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"replicas": {"type": "integer"}},
            },
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        },
    }
    ok = {"template": {"spec": {"containers": [{"name": "x"}]}}, "partial": {"replicas": 1, "anything": {}}}
    assert crd_errors(ok, schema) == []
    assert crd_errors({"partial": {"replicas": "1"}}, schema) == ["partial.replicas: expected an integer, got '1'"]
    assert crd_errors({"closed": {"b": 1}}, schema) == [
        "closed.b: not in the CRD schema (the API server would prune it)"
    ]


# ---------------------------------------------------------------------------------------------------------------
# (d) cluster shape: no work on the head, enough GPUs, ports, weights volume, image


def test_head_does_no_work_and_workers_have_the_gpus():
    rs = load_rayservice()
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert gpu_count(ray_container(head["template"])) == 0

    args = app_args(rayservice_serve_config(rs))
    pool = pool_args(rayservice_serve_config(rs))  # the application that starts the workers
    groups = cluster["workerGroupSpecs"]
    assert groups and all(gpu_count(ray_container(g["template"])) > 0 for g in groups)
    total = sum(g.get("replicas", g.get("minReplicas", 0)) * gpu_count(ray_container(g["template"])) for g in groups)
    for g in groups:
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert "num-gpus" not in g.get("rayStartParams", {}), "let KubeRay derive num-gpus from the GPU limit"
    # The expert workers' GPUs plus one GPU for every frontend replica the app may scale to.
    assert args.parallel.gpus_per_worker is not None, "the production file pins gpus_per_worker"
    assert pool.parallel.gpus_per_worker == args.parallel.gpus_per_worker  # the frontends size their GPU from it
    assert total >= args.parallel.expert_workers + args.serving.max_frontends
    assert total >= args.parallel.expert_workers * args.parallel.gpus_per_worker + args.serving.max_frontends
    assert total >= pool.parallel.expert_workers * pool.parallel.gpus_per_worker + args.serving.max_frontends


def test_head_ports_and_services():
    rs = load_rayservice()
    serve_cfg = rayservice_serve_config(rs)
    head = ray_container(rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])
    ports = {p.get("name"): p["containerPort"] for p in head["ports"]}
    # KubeRay builds <name>-serve-svc from the head container port named "serve" (and only from that port).
    assert ports["serve"] == serve_cfg["http_options"]["port"] == HTTP_PORT
    assert GRPC_PORT in ports.values() and serve_cfg["grpc_options"]["port"] == GRPC_PORT
    assert ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379
    for name in ports:
        assert name and len(name) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name), name
    # All interfaces of the head pod: the KubeRay operator reaches the dashboard through the head Service (a
    # 127.0.0.1 dashboard would leave serveConfigV2 undeployed). Closed by token auth and the NetworkPolicy instead.
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    assert rs["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"
    custom = rs["spec"].get("serveService")
    if custom:  # KubeRay keeps only the "serve" port of a custom serve Service
        assert {p.get("name") for p in custom["spec"]["ports"]} <= {"serve"}


def test_weights_volume_and_image():
    rs = load_rayservice()
    cluster = rs["spec"]["rayClusterConfig"]
    model = app_args(rayservice_serve_config(rs)).load.model
    assert model is not None and pool_args(rayservice_serve_config(rs)).load.model == model
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        container = ray_container(template)
        assert container["image"] == "mixserve:0.1.0"
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/models"]
        assert len(mounts) == 1 and mounts[0].get("readOnly") is True
        claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == "mixtral-weights"
        assert model.startswith(mounts[0]["mountPath"] + "/")


def test_ray_version_matches_the_image():
    rs = load_rayservice()
    base = next(
        args
        for word, args in dockerfile_instructions(DOCKERFILE.read_text())
        if word == "ARG" and args.startswith("BASE_IMAGE=")
    )
    tag = base.split("=", 1)[1].split(":", 1)[1]
    assert tag.startswith(rs["spec"]["rayClusterConfig"]["rayVersion"] + "-py")


# ---------------------------------------------------------------------------------------------------------------
# (e) Dockerfile and .dockerignore


def test_dockerfile():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    words = [w for w, _ in instructions]
    assert "FROM" in words
    args = dict(a.split("=", 1) if "=" in a else (a, "") for w, a in instructions if w == "ARG")
    base = args["BASE_IMAGE"]
    repo, _, tag = base.partition(":")
    assert repo == "rayproject/ray"
    assert re.fullmatch(r"\d+\.\d+\.\d+-py3\d+-(gpu|cpu|cu\d+)", tag), tag
    assert "INSTALL_FLASH_ATTN" in args

    exposed = {int(p.split("/")[0]) for w, a in instructions if w == "EXPOSE" for p in a.split()}
    assert {HTTP_PORT, GRPC_PORT} <= exposed

    runs = " ; ".join(a for w, a in instructions if w == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|;|$)", runs), "installs the package itself"
    assert "--no-build-isolation" in runs and ".[gpu]" in runs  # the optional flash-attn extra
    assert "pip install -e" not in runs

    cmd = next(a for w, a in reversed(instructions) if w == "CMD")
    assert yaml.safe_load(cmd) == ["mixserve", "serve", "--host", "0.0.0.0"]  # exec form (a JSON list)
    copies = " ".join(a for w, a in instructions if w in {"COPY", "ADD"})
    assert ".safetensors" not in copies and "/models" not in copies, "no weights in the image"
    for word, rest in instructions:
        if word in {"COPY", "ADD"}:
            assert shlex.split(rest)[-1].startswith("/home/ray"), rest


def test_dockerignore():
    patterns = {
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    for needed in [".git", ".venv", "**/__pycache__", ".pytest_cache", ".ruff_cache"]:
        assert needed in patterns, needed
    assert not any(p.startswith("cluster") or p.startswith("deploy") for p in patterns)


def test_kubernetes_doc_names_match_the_manifests():
    text = KUBERNETES_MD.read_text()
    rs = load_rayservice()
    name = rs["metadata"]["name"]
    assert f"{name}-serve-svc" in text and f"{name}-head-svc" in text
    assert "mixtral-weights" in text and "deploy/kuberay/rayservice.yaml" in text
    assert "docker build -f deploy/Dockerfile" in text
    assert POOL_APP_NAME in text and "expert_pool" in text  # the two applications are explained


def test_model_lookup_sees_through_optional_list_and_dict():
    fields = ServeDeploySchema.model_fields
    assert _models_in(fields["http_options"].annotation) == [fields["http_options"].annotation]
    assert len(_models_in(fields["controller_options"].annotation)) == 1  # Optional[ControllerOptions]
    assert [m.__name__ for m in _models_in(fields["applications"].annotation)] == ["ServeApplicationSchema"]
    app_fields = _models_in(fields["applications"].annotation)[0].model_fields
    assert _models_in(app_fields["args"].annotation) == [] and _models_in(types.NoneType) == []


# ---------------------------------------------------------------------------------------------------------------
# (f) closed by default: API keys from a Secret, nothing exposed that is not said, limits set


def test_rayservice_reads_the_api_keys_from_a_secret_never_inline():
    rs = load_rayservice()
    cfg = rayservice_serve_config(rs)
    a = app_args(cfg)
    assert a.serving.api_key == [] and a.serving.api_key_file is not None
    folder = str(Path(a.serving.api_key_file).parent)
    cluster = rs["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:  # the ingress replica may run in any pod: each one mounts the Secret
        container = ray_container(template)
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == folder]
        assert len(mounts) == 1 and mounts[0].get("readOnly") is True
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mounts[0]["name"])
        assert volume["secret"]["secretName"] == "mixserve-api-keys"
        assert not volume["secret"].get("optional", False), "a missing Secret must stop the pod, not open the API"
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(a.serving.max_request_bytes)
    assert "kubectl create secret generic mixserve-api-keys" in RAYSERVICE.read_text()
    assert "mixserve-api-keys" in KUBERNETES_MD.read_text()


def test_rayservice_says_what_is_exposed_and_a_network_policy_enforces_it():
    text = RAYSERVICE.read_text()
    assert "What is exposed" in text
    for port in ("8000", "9000", "8265", "6379"):
        assert f"#   {port}" in text, port
    docs = [d for d in yaml.safe_load_all(text) if d]
    policy = next(d for d in docs if d.get("kind") == "NetworkPolicy")
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mixserve"}
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
    assert open_ports == {HTTP_PORT, GRPC_PORT}  # only the API is open to the whole cluster
    dashboard = [r for r in policy["spec"]["ingress"] if any(p["port"] == 8265 for p in r.get("ports", []))]
    assert len(dashboard) == 1 and all("namespaceSelector" in f for f in dashboard[0]["from"])


def test_serve_config_keeps_keys_out_and_binds_loopback():
    cfg = load_serve_config()
    a = app_args(cfg)
    assert a.serving.api_key == [] and cfg["http_options"]["host"] == "127.0.0.1"
    assert "EVERY" in SERVE_CONFIG.read_text()  # says plainly that the gRPC proxy binds every interface
