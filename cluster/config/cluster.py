"""The one configuration of a frontend and its expert workers, composed of parts (as vLLM's ``VllmConfig`` is):

    ClusterConfig
      load      LoadConfig      the checkpoint, dtype, tokenizer, device, attention backend  (cluster.config.load)
      engine    EngineConfig    scheduler limits, KV block size, prefix caching               (cluster.config.engine)
      cache     CacheConfig     how many KV blocks the frontend allocates                    (cluster.config.engine)
      parallel  ParallelConfig  expert workers, copies, transport, placement, resources      (cluster.config.parallel)

Users name options flat (``LLM(model, expert_workers=2, dtype="bfloat16")``, ``--expert-workers 2``, Serve ``args``):
every field name belongs to exactly one part, and :meth:`Composed.from_options` hands each to its part. A bad or
unknown option is one :class:`~cluster.errors.SetupError` naming every bad field. No torch and no Ray here; turning
the model into a local folder and ``dtype="auto"`` into a concrete dtype is ``cluster.checkpoint.locate.resolve``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.config.engine import CacheConfig, EngineConfig
from cluster.config.load import LoadConfig
from cluster.config.parallel import ParallelConfig
from cluster.errors import SetupError


def describe(e: ValidationError, what: str) -> str:
    """One line naming every bad field: ``what: field: problem; field: problem``."""
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in e.errors())
    return f"{what}: {problems}"


class Composed(BaseModel):
    """A config made of parts (fields whose type is a pydantic model), each option named flat.

    ``DEFAULTS``: option values this config uses instead of its part's default (the Serve application runs 2
    expert workers unless told otherwise). ``ERROR``: the exception class a bad option raises. Checks that span
    parts: :meth:`check_parts`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    DEFAULTS: ClassVar[dict[str, Any]] = {}
    ERROR: ClassVar[type[SetupError]] = SetupError
    WHAT: ClassVar[str] = ""  # how error messages name this config (default: the class name)

    @classmethod
    def parts(cls) -> dict[str, type[BaseModel]]:
        """Part name -> its model class, in declaration order."""
        out = {}
        for name, f in cls.model_fields.items():
            kind = f.annotation
            assert isinstance(kind, type) and issubclass(kind, BaseModel), f"{cls.__name__}.{name} is not a part"
            out[name] = kind
        return out

    @classmethod
    def owners(cls) -> dict[str, str]:
        """Option name -> the part that holds it."""
        return {option: part for part, kind in cls.parts().items() for option in kind.model_fields}

    @classmethod
    def default_of(cls, option: str) -> Any:
        """The value ``option`` takes when it is not given."""
        if option in cls.DEFAULTS:
            return cls.DEFAULTS[option]
        f = cls.parts()[cls.owners()[option]].model_fields[option]
        return f.get_default(call_default_factory=True)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **more: Any) -> Self:
        """Each option to its part (``DEFAULTS`` for those not given); every bad or unknown option named in one
        :attr:`ERROR`."""
        given = {**cls.DEFAULTS, **(options or {}), **more}
        owners = cls.owners()
        problems = [f"{name}: unknown option" for name in given if name not in owners]
        parts: dict[str, Any] = {}
        for part, kind in cls.parts().items():
            try:
                parts[part] = kind(**{k: v for k, v in given.items() if owners.get(k) == part})
            except ValidationError as e:
                problems.append(describe(e, "").removeprefix(": "))
        if not problems:
            problems = cls.check_parts(parts)
        if problems:
            raise cls.ERROR(f"invalid {cls.WHAT or cls.__name__}: {'; '.join(problems)}")
        return cls(**parts)

    @classmethod
    def check_parts(cls, parts: dict[str, Any]) -> list[str]:
        """``option: problem`` for each problem that spans parts, or that this config adds to its parts' checks."""
        return []

    def options(self) -> dict[str, Any]:
        """Every option, flat (what :meth:`from_options` takes back)."""
        return {k: v for part in self.parts() for k, v in getattr(self, part).model_dump().items()}

    def with_options(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated again."""
        return self.from_options({**self.options(), **changes})


class ClusterConfig(Composed):
    """Everything needed to build a serving frontend and its expert workers (see the module docstring)."""

    load: LoadConfig = LoadConfig.model_validate({})
    engine: EngineConfig = EngineConfig.model_validate({})
    cache: CacheConfig = CacheConfig.model_validate({})
    parallel: ParallelConfig = ParallelConfig.model_validate({})

    @classmethod
    def create(cls, **options: Any) -> ClusterConfig:
        """Validated from flat options; a bad one is a :class:`SetupError` naming it."""
        return cls.from_options(options)
