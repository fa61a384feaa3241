"""Typed skeleton of a manifest: top-level keys, groups and runs.

The ``model``/``data``/``train`` sections stay partial mappings here; ``attnlab.manifest`` merges
them per run and validates the result as ``ModelConfig``/``DataConfig``/``TrainConfig``. This
module sees the tree *after* ``extends`` and ``${vars}`` have been resolved.

Later work adds per-run keys (``mode``, ``verify``) and per-group ``benchmarks`` as new fields of
``RunSpec``/``GroupSpec``; until then they are unknown keys.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, PrivateAttr, field_validator

from attnlab.config.upcycle import RunMode
from attnlab.config.base import StrictModel, validate_section
from attnlab.config.limits import Limits, default_limits
from attnlab.errors import ConfigError

MANIFEST_VERSION = 1
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"  # with _safe_name below: attnlab.paths.NAME_RE
# Every key a manifest file (or a file it extends) may have at its top level.
TOP_LEVEL_KEYS = (
    "version", "name", "description", "extends", "vars", "defaults", "model", "data", "train", "cache", "groups",
)
SECTIONS = ("model", "data", "train", "cache")


def _safe_name(value: str) -> str:
    if value.strip(".") == "":
        raise ValueError("must not consist of dots only (it names a folder)")
    if value.startswith("."):
        raise ValueError("must not start with '.' (it names a folder)")
    return value


# Used in folder names: <out_dir>/<name>/<group>/<run_id>.
Name = Annotated[str, Field(pattern=NAME_PATTERN), AfterValidator(_safe_name)]  # length: attnlab.paths


def _none_is_empty(value: Any) -> Any:
    # ``model:`` with nothing after it is YAML null; read it as an empty section.
    return {} if value is None else value


class ManifestDefaults(StrictModel):
    """Run-level defaults. ``out_dir``: root of run folders (relative: against the current
    working directory); each run writes to ``<out_dir>/<manifest name>/<group>/<run id>``."""

    out_dir: str = Field("runs", min_length=1)
    limits: Limits = Field(default_factory=default_limits, description="size limits checked before anything is built")

    @field_validator("limits", mode="before")
    @classmethod
    def _limits_over_env(cls, value: Any) -> Any:
        # keys not given keep the environment's (ATTNLAB_MAX_*) or built-in value
        if isinstance(value, dict):
            return {**default_limits().model_dump(), **value}
        return value


class RunSpec(StrictModel):
    """One run: partial sections merged over the manifest's top-level sections."""

    id: Name
    description: str = ""
    model: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    cache: dict[str, Any] = Field(default_factory=dict)
    mode: RunMode = "train"
    teacher: str | None = Field(None, description="model source or run:<id>: the model imported, upcycled or distilled from")
    init_from: str | None = Field(None, description="blockwise/finetune: the student's starting weights (run:<id> or a source)")
    surgery: dict[str, Any] | None = None
    retrofit: dict[str, Any] | None = None
    distill: dict[str, Any] = Field(default_factory=dict)
    verify: dict[str, Any] | None = None
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(
        None, min_length=1, max_length=64,
        description="one run per seed: ids <id>-s<seed>, train.seed set; reports aggregate them as one arm")

    _sections_none = field_validator("model", "data", "train", "cache", "distill", mode="before")(_none_is_empty)
    _arm: str | None = PrivateAttr(None)

    @property
    def arm(self) -> str | None:
        """The id of the seeded run this one was expanded from (None for plain runs)."""
        return self._arm


class GroupSpec(StrictModel):
    """A named list of runs (``attnlab run M.yml --group G`` selects one)."""

    name: Name
    description: str = ""
    runs: list[RunSpec] = Field(min_length=1)
    benchmarks: list[Any] = Field(default_factory=list, description="benchmark specs run after training")


class ManifestSpec(StrictModel):
    """The whole manifest after ``extends`` and ``${vars}`` resolution (``vars`` holds the
    resolved values)."""

    version: int
    name: Name
    description: str = ""
    vars: dict[str, Any] = Field(default_factory=dict)
    defaults: ManifestDefaults = Field(default_factory=ManifestDefaults)
    model: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    cache: dict[str, Any] = Field(default_factory=dict)
    groups: list[GroupSpec] = Field(min_length=1)

    _none = field_validator("vars", "defaults", "model", "data", "train", "cache", mode="before")(_none_is_empty)

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: int) -> int:
        if value != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version; this attnlab reads version {MANIFEST_VERSION}")
        return value


def item_label(list_key: str | None, index: int, item: Any) -> str:
    """``[i]`` plus ``(name)`` for groups and ``(id)`` for runs, so paths read
    ``groups[0](compare).runs[1](dba).model``."""
    label_key = {"groups": "name", "runs": "id"}.get(list_key or "")
    label = item.get(label_key) if label_key and isinstance(item, dict) else None
    return f"[{index}]({label})" if isinstance(label, str) else f"[{index}]"


def parse_manifest(tree: Any) -> ManifestSpec:
    """Validate the manifest skeleton; errors name e.g. ``groups[0](compare).runs[2](x).id``."""
    if not isinstance(tree, dict):
        raise ConfigError("", "a manifest must be a mapping", type(tree).__name__)
    if "version" not in tree:
        raise ConfigError("version", "required key is missing", show_value=False)
    version = tree["version"]
    if type(version) is not int or version != MANIFEST_VERSION:
        raise ConfigError(
            "version", f"unsupported manifest version; this attnlab reads version {MANIFEST_VERSION}", version
        )
    # Validate runs and groups one by one first, so their errors carry the (name)/(id) labels.
    groups = tree.get("groups")
    if isinstance(groups, list):
        for gi, group in enumerate(groups):
            gpath = "groups" + item_label("groups", gi, group)
            _require_mapping(group, gpath, "a group", GroupSpec)
            runs = group.get("runs")
            if isinstance(runs, list):
                for ri, run in enumerate(runs):
                    rpath = f"{gpath}.runs{item_label('runs', ri, run)}"
                    _require_mapping(run, rpath, "a run", RunSpec)
                    validate_section(RunSpec, run, rpath)
            validate_section(GroupSpec, group, gpath)
    spec = validate_section(ManifestSpec, tree, "")
    _expand_seeds(spec)
    _check_unique(spec)
    return spec


def seeded_id(run_id: str, seed: int) -> str:
    return f"{run_id}-s{seed}"


def _expand_seeds(spec: ManifestSpec) -> None:
    """Replace each run with ``seeds`` by one run per seed (``seeded_id``, ``train.seed``); the
    copies remember their arm (``RunSpec.arm``). A ``run:<id>`` teacher/init_from naming a seeded run
    resolves to the same seed's copy, so a seeded student pairs with its seeded teacher."""
    for gi, group in enumerate(spec.groups):
        seeded = {run.id: run.seeds for run in group.runs if run.seeds}
        if not seeded:
            continue
        runs: list[RunSpec] = []
        for ri, run in enumerate(group.runs):
            path = f"groups[{gi}]({group.name}).runs[{ri}]({run.id})"
            if len(set(run.seeds or [])) != len(run.seeds or []):
                raise ConfigError(f"{path}.seeds", "lists a seed twice", run.seeds)
            for seed in run.seeds or [None]:
                update: dict[str, Any] = {}
                for key in ("teacher", "init_from"):
                    ref = getattr(run, key)
                    if isinstance(ref, str) and ref.startswith("run:") and ref[4:] in seeded:
                        if seed is None or seed not in seeded[ref[4:]]:
                            choices = ", ".join(f"run:{seeded_id(ref[4:], s)}" for s in seeded[ref[4:]])
                            raise ConfigError(f"{path}.{key}", f"run {ref[4:]!r} is expanded over seeds; name one "
                                              f"of {choices} (or give this run the same seeds)", ref)
                        update[key] = f"run:{seeded_id(ref[4:], seed)}"
                if seed is not None:
                    update.update(id=seeded_id(run.id, seed), train={**run.train, "seed": seed}, seeds=None)
                copy = run.model_copy(update=update)
                copy._arm = run.id if seed is not None else None
                runs.append(copy)
        spec.groups[gi] = group.model_copy(update={"runs": runs})


def _require_mapping(value: Any, path: str, what: str, cls: type[StrictModel]) -> None:
    if not isinstance(value, dict):
        keys = ", ".join(cls.model_fields)
        raise ConfigError(path, f"expected {what}: a mapping with keys {keys}", value,
                          show_value=not isinstance(value, (dict, list)))


def _check_unique(spec: ManifestSpec) -> None:
    seen_groups: dict[str, int] = {}
    for gi, group in enumerate(spec.groups):
        gpath = f"groups[{gi}]({group.name})"
        if group.name in seen_groups:
            raise ConfigError(
                f"{gpath}.name", f"duplicate group name (also groups[{seen_groups[group.name]}])", group.name
            )
        seen_groups[group.name] = gi
        seen_runs: dict[str, int] = {}
        for ri, run in enumerate(group.runs):
            if run.id in seen_runs:
                raise ConfigError(
                    f"{gpath}.runs[{ri}]({run.id}).id",
                    f"duplicate run id in group '{group.name}' (also runs[{seen_runs[run.id]}])",
                    run.id,
                )
            seen_runs[run.id] = ri
