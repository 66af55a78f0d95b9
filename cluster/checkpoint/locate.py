"""Where a config's model is on disk, and the concrete dtype and device it runs with.

:func:`resolve` turns a validated :class:`~cluster.config.cluster.ClusterConfig` into one whose model is a local
folder (a Hugging Face id looked up in the local cache; None: the built-in tiny model, written once) and whose
dtype is concrete (:func:`~cluster.config.dtype.resolve_dtype`). Nothing is downloaded unless ``download``.
"""

from __future__ import annotations

from pathlib import Path

from cluster.config.cluster import ClusterConfig
from cluster.config.dtype import resolve_dtype
from cluster.config.model import ModelConfig
from cluster.config.quantization import OnLoad, check_on_load
from cluster.errors import SetupError


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu (torch is imported here, not with this module: the ingress reads
    :func:`model_folder` without it)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_folder(model: str | None, *, download: bool = False) -> str:
    """A checkpoint folder as given, the local snapshot of a Hugging Face model id ("org/name"), or (None) the
    built-in tiny model."""
    if model is None:
        from cluster.checkpoint.tiny_model import default_model_dir  # torch: it writes the model the first time

        return str(default_model_dir())
    if Path(model).is_dir():
        return model
    if model.count("/") != 1 or Path(model).exists():
        raise SetupError(f"model {model!r} is not a checkpoint folder")
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(model, local_files_only=not download)
    except Exception as e:  # the hub client raises several types for "not cached" / "not found"
        hint = "" if download else " (mixserve downloads nothing unless asked: pass download=True / --download)"
        raise SetupError(f"model {model!r} is not a folder and not in the Hugging Face cache{hint}: {e}") from None


def resolve(config: ClusterConfig) -> ClusterConfig:
    """``config`` with the model as a local folder and a concrete dtype (idempotent)."""
    load = config.load
    folder = model_folder(load.model, download=load.download)
    _check_quantization(folder, load.quantization)
    dtype = resolve_dtype(load.dtype, folder, load.device or default_device())
    if (folder, dtype) == (load.model, load.dtype):
        return config
    return config.model_copy(update={"load": load.model_copy(update={"model": folder, "dtype": dtype})})


def _check_quantization(folder: str, quantization: OnLoad | None) -> None:
    """A quantized checkpoint with another ``quantization`` is refused here, before any worker starts."""
    if quantization is None:
        return
    check_on_load(ModelConfig.from_dir(folder).quantization, quantization, folder=folder)
