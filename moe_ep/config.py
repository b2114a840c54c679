"""YAML configs that choose an All2All manager per topology and phase.

A config file is the serialisation of the frozen dataclasses below::

    description: one line shown by `moe-ep check-config`
    parallel:    {tensor_parallel_size: 1, pipeline_parallel_size: 1, data_parallel_size: null}
    collectives: {custom_all_reduce: true, shared_memory: true}
    all2all:
      rules:                       # tried in order; the first that matches AND is available wins
        - when: {device: cuda, internode: false, phase: decode}
          use: deepep_low_latency
          options: {max_tokens_per_rank: 128}
      fallback: [alltoallv, {use: allgather_reducescatter}]
      strict: false                # true: a matching rule whose backend is unavailable is an error

`when` keys (all optional, all must hold): `device` (cpu | cuda), `internode` (bool),
`world_size` and `gpus_per_node` (an int, or a range `{min: 2, max: 8}`, inclusive, either end
optional), `phase` (prefill | decode), `nvlink` (bool). An empty `when` always matches.

Selection is the pure function `select(config, topology, phase, availability=...)`; it never
communicates, so every rank that sees the same topology picks the same manager.
`build_manager_from_config` adds topology detection and a cross-rank agreement check.

Errors raise `ConfigError` (a ValueError) naming the file, the key path and what is allowed;
`SelectionError` (a RuntimeError) when no listed backend can run here.
"""

from __future__ import annotations

import logging
import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from moe_ep.distributed.group import GroupCoordinator
    from moe_ep.distributed.topology import Topology

__all__ = [
    "DEVICES",
    "PHASES",
    "All2AllConfig",
    "CollectivesConfig",
    "Config",
    "ConfigError",
    "IntRange",
    "Options",
    "ParallelConfig",
    "Rule",
    "Selection",
    "SelectionError",
    "When",
    "build_manager_from_config",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_config",
    "select",
    "shipped_configs",
]

PHASES = ("prefill", "decode")
DEVICES = ("cpu", "cuda")


class ConfigError(ValueError):
    """A config that cannot be loaded: names the file, the key path and what is allowed."""

    def __init__(self, source: str, path: str, message: str):
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {message}")


class SelectionError(RuntimeError):
    """No rule or fallback of a config names a backend that can run on this topology."""


# --------------------------------------------------------------------------- value objects


class Options(Mapping[str, Any]):
    """Read-only, hashable, picklable mapping of backend options (`build_manager(**options)`).

    Lists are stored as tuples so that two equal configs compare and hash equal.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None):
        self._items = {k: tuple(v) if isinstance(v, list) else v
                       for k, v in sorted((items or {}).items())}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"Options({self._items!r})"

    def __reduce__(self):
        return (Options, (self._items,))


@dataclass(frozen=True)
class IntRange:
    """Inclusive integer range; `None` leaves that end open. YAML: `8` or `{min: 2, max: 8}`."""

    min: int | None = None
    max: int | None = None

    def __contains__(self, value: int) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        if self.min is not None and self.min == self.max:
            return str(self.min)
        if self.max is None:
            return f">= {self.min}"
        if self.min is None:
            return f"<= {self.max}"
        return f"{self.min}..{self.max}"

    def to_yaml(self) -> int | dict[str, int]:
        if self.min is not None and self.min == self.max:
            return self.min
        return {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}


@dataclass(frozen=True)
class When:
    """Conditions on the topology and phase; `None` = any. All given conditions must hold."""

    device: str | None = None
    internode: bool | None = None
    world_size: IntRange | None = None
    phase: str | None = None
    nvlink: bool | None = None
    gpus_per_node: IntRange | None = None

    def mismatch(self, topology: Topology, phase: str | None) -> str | None:
        """Why this condition does not hold (first failing key), or None when it matches."""
        if self.device is not None and topology.device != self.device:
            return f"device is {topology.device}, rule needs {self.device}"
        if self.internode is not None and topology.internode != self.internode:
            have = f"{topology.num_nodes} nodes" if topology.internode else "a single node"
            need = "internode" if self.internode else "a single node"
            return f"job spans {have}, rule needs {need}"
        if self.world_size is not None and topology.world_size not in self.world_size:
            return f"world size is {topology.world_size}, rule needs {self.world_size}"
        if self.gpus_per_node is not None and topology.gpus_per_node not in self.gpus_per_node:
            return f"gpus per node is {topology.gpus_per_node}, rule needs {self.gpus_per_node}"
        if self.nvlink is not None and topology.nvlink is not self.nvlink:
            have = {True: "present", False: "absent", None: "unknown"}[topology.nvlink]
            return f"NVLink is {have}, rule needs nvlink={str(self.nvlink).lower()}"
        if self.phase is not None and phase != self.phase:
            have = f"phase is {phase}" if phase is not None else "no phase given"
            return f"{have}, rule needs {self.phase}"
        return None

    def describe(self) -> str:
        """`{device: cuda, phase: decode}` style text; `always` for an empty condition."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(f"{f.name}: {text}")
        return "{" + ", ".join(parts) + "}" if parts else "always"


@dataclass(frozen=True)
class Rule:
    """`use` backend `use` with `options` when `when` holds. Fallback entries have an empty
    `when`. `where` is the key path in the file (for messages), not part of equality."""

    use: str
    when: When = field(default_factory=When)
    options: Options = field(default_factory=Options)
    where: str = field(default="", compare=False)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.use}({opts})" if opts else self.use


@dataclass(frozen=True)
class All2AllConfig:
    rules: tuple[Rule, ...] = ()
    fallback: tuple[Rule, ...] = ()
    strict: bool = False


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes for `initialize_model_parallel`; `data_parallel_size=None` = world // (TP * PP)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int | None = None


@dataclass(frozen=True)
class CollectivesConfig:
    """Switches for the collective layer (used where the platform supports them)."""

    custom_all_reduce: bool = True
    shared_memory: bool = True


@dataclass(frozen=True)
class Config:
    all2all: All2AllConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    collectives: CollectivesConfig = field(default_factory=CollectivesConfig)
    description: str = ""
    source: str = field(default="<config>", compare=False)

    def model_parallel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `moe_ep.distributed.initialize_model_parallel`."""
        return {
            "tensor_parallel_size": self.parallel.tensor_parallel_size,
            "pipeline_parallel_size": self.parallel.pipeline_parallel_size,
            "data_parallel_size": self.parallel.data_parallel_size,
            "use_shm": self.collectives.shared_memory,
        }


@dataclass(frozen=True)
class Selection:
    """Result of `select`: build `name` with `options`; `rule` is the winning rule or fallback
    entry; `skipped` lists every rule tried before it with the reason it was passed over."""

    name: str
    options: Options
    rule: Rule
    skipped: tuple[tuple[Rule, str], ...] = ()

    @property
    def where(self) -> str:
        return self.rule.where


# --------------------------------------------------------------------------- registry access


def _registry_names() -> tuple[tuple[str, ...], dict[str, str]]:
    """(canonical backend names, alias -> canonical) from the manager registry, so a new
    backend registered there is accepted by configs without touching this file."""
    from moe_ep.managers import registry

    return tuple(registry.known_managers()), dict(registry.ALIASES)


def _default_availability(topology: Topology) -> Mapping[str, tuple[bool, str]]:
    from moe_ep.managers.registry import available_managers

    return available_managers(topology)


# --------------------------------------------------------------------------- parsing


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one,
    which would hide a typo'd second rule)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep=False):
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line}, first on line {first})",
                key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


class _Parser:
    """Validates a YAML tree into dataclasses; every error names source + key path."""

    def __init__(self, source: str, names: tuple[str, ...], aliases: Mapping[str, str]):
        self.source = source
        self.names = names
        self.aliases = aliases

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(self.source, path, message)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping with keys {_alts(allowed)}, "
                                  f"got {_kind(value)}")
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                hint = _did_you_mean(key, allowed)
                raise self.fail(_join(path, key), f"unknown key {key!r}{hint}; allowed keys: "
                                                  f"{_alts(allowed)}")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {_kind(value)}")
        return value

    def integer(self, value: Any, path: str, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected an integer >= {minimum}, got {_kind(value)}")
        if value < minimum:
            raise self.fail(path, f"expected an integer >= {minimum}, got {value}")
        return value

    def choice(self, value: Any, path: str, allowed: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(path, f"{_kind(value)} is not allowed; expected one of "
                                  f"{_alts(allowed)}")
        return value

    def int_range(self, value: Any, path: str) -> IntRange:
        expected = "expected an integer or a range {min: int, max: int}"
        if isinstance(value, Mapping):
            self.mapping(value, path, ("min", "max"))
            if not value:
                raise self.fail(path, f"empty range; {expected}")
            lo = None if value.get("min") is None else self.integer(value["min"], path + ".min")
            hi = None if value.get("max") is None else self.integer(value["max"], path + ".max")
            if lo is not None and hi is not None and lo > hi:
                raise self.fail(path, f"min {lo} is greater than max {hi}")
            return IntRange(lo, hi)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"{expected}, got {_kind(value)}")
        self.integer(value, path)
        return IntRange(value, value)

    def backend(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a backend name, got {_kind(value)}; "
                                  f"known backends: {_alts(self.names)}")
        if value in self.names:
            return value
        if value in self.aliases:
            return self.aliases[value]
        hint = _did_you_mean(value, self.names + tuple(self.aliases))
        raise self.fail(path, f"unknown backend {value!r}{hint}; known backends: "
                              f"{_alts(self.names)}")

    def options(self, value: Any, path: str) -> Options:
        if value is None:
            return Options()
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping of option names to values, "
                                  f"got {_kind(value)}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise self.fail(_join(path, key), "option names must be identifiers")
            out[key] = self.option_value(item, _join(path, key))
        return Options(out)

    def option_value(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return tuple(self.option_value(v, f"{path}[{i}]") for i, v in enumerate(value))
        raise self.fail(path, f"expected a scalar or a list of scalars, got {_kind(value)}")

    def when(self, value: Any, path: str) -> When:
        if value is None:
            return When()
        keys = tuple(f.name for f in dataclasses.fields(When))
        value = self.mapping(value, path, keys)
        get = value.get
        return When(
            device=None if get("device") is None
            else self.choice(value["device"], path + ".device", DEVICES),
            internode=None if get("internode") is None
            else self.boolean(value["internode"], path + ".internode"),
            world_size=None if get("world_size") is None
            else self.int_range(value["world_size"], path + ".world_size"),
            phase=None if get("phase") is None
            else self.choice(value["phase"], path + ".phase", PHASES),
            nvlink=None if get("nvlink") is None
            else self.boolean(value["nvlink"], path + ".nvlink"),
            gpus_per_node=None if get("gpus_per_node") is None
            else self.int_range(value["gpus_per_node"], path + ".gpus_per_node"),
        )

    def rule(self, value: Any, path: str, *, with_when: bool) -> Rule:
        if isinstance(value, str) and not with_when:
            return Rule(use=self.backend(value, path), where=path)
        keys = ("when", "use", "options") if with_when else ("use", "options")
        value = self.mapping(value, path, keys)
        if "use" not in value:
            raise self.fail(path, f"missing key 'use' (the backend to build; known backends: "
                                  f"{_alts(self.names)})")
        use = self.backend(value["use"], path + ".use")
        when = self.when(value.get("when"), path + ".when") if with_when else When()
        options = self.options(value.get("options"), path + ".options")
        self.check_backend_options(use, options, path + ".options")
        return Rule(use=use, when=when, options=options, where=path)

    def check_backend_options(self, use: str, options: Options, path: str) -> None:
        """Validate options against the backend's own options dataclass, so a typo fails at
        load time on any machine rather than at build time on the one that selects it.

        The options dataclasses live in `moe_ep.managers.options`: no backend module is
        imported. Skipped for placeholders, which declare no options yet.
        """
        from moe_ep.managers.registry import options_class

        cls = options_class(use)
        if cls is None:
            return
        allowed = tuple(f.name for f in dataclasses.fields(cls))
        for key in options:
            if key not in allowed:
                hint = _did_you_mean(key, allowed)
                listed = _alts(allowed) if allowed else "none"
                raise self.fail(_join(path, key), f"unknown option {key!r} for {use}{hint}; "
                                                  f"allowed options: {listed}")
        try:
            cls(**dict(options))
        except (TypeError, ValueError) as exc:
            raise self.fail(path, f"invalid options for {use}: {exc}") from None

    def rules(self, value: Any, path: str, *, with_when: bool) -> tuple[Rule, ...]:
        what = "rules" if with_when else "backends"
        if value is None or (isinstance(value, (list, tuple)) and not value):
            raise self.fail(path, f"is empty; list at least one of the {what} or remove the key")
        if not isinstance(value, (list, tuple)):
            if not with_when and isinstance(value, str):
                value = [value]  # `fallback: alltoallv` is a one-element list
            else:
                raise self.fail(path, f"expected a list of {what}, got {_kind(value)}")
        return tuple(self.rule(v, f"{path}[{i}]", with_when=with_when)
                     for i, v in enumerate(value))

    def all2all(self, value: Any, path: str) -> All2AllConfig:
        value = self.mapping(value, path, ("rules", "fallback", "strict"))
        rules = self.rules(value["rules"], path + ".rules", with_when=True) \
            if "rules" in value else ()
        fallback = self.rules(value["fallback"], path + ".fallback", with_when=False) \
            if "fallback" in value else ()
        if not rules and not fallback:
            raise self.fail(path, "nothing to select: give 'rules' and/or 'fallback'")
        strict = self.boolean(value.get("strict", False), path + ".strict")
        return All2AllConfig(rules=rules, fallback=fallback, strict=strict)

    def parallel(self, value: Any, path: str) -> ParallelConfig:
        if value is None:
            return ParallelConfig()
        keys = tuple(f.name for f in dataclasses.fields(ParallelConfig))
        value = self.mapping(value, path, keys)
        dp = value.get("data_parallel_size")
        return ParallelConfig(
            tensor_parallel_size=self.integer(value.get("tensor_parallel_size", 1),
                                              path + ".tensor_parallel_size"),
            pipeline_parallel_size=self.integer(value.get("pipeline_parallel_size", 1),
                                                path + ".pipeline_parallel_size"),
            data_parallel_size=None if dp is None
            else self.integer(dp, path + ".data_parallel_size"),
        )

    def collectives(self, value: Any, path: str) -> CollectivesConfig:
        if value is None:
            return CollectivesConfig()
        keys = tuple(f.name for f in dataclasses.fields(CollectivesConfig))
        value = self.mapping(value, path, keys)
        return CollectivesConfig(**{k: self.boolean(v, _join(path, k)) for k, v in value.items()})

    def config(self, value: Any) -> Config:
        if value is None:
            raise self.fail("", "the config is empty; it needs at least an 'all2all' section")
        value = self.mapping(value, "(top level)",
                             ("description", "parallel", "collectives", "all2all"))
        if "all2all" not in value:
            raise self.fail("all2all", "missing section (rules and/or fallback that choose "
                                       "the manager)")
        description = value.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise self.fail("description", f"expected a string, got {_kind(description)}")
        return Config(
            all2all=self.all2all(value["all2all"], "all2all"),
            parallel=self.parallel(value.get("parallel"), "parallel"),
            collectives=self.collectives(value.get("collectives"), "collectives"),
            description=description.strip(),
            source=self.source,
        )


def _join(path: str, key: Any) -> str:
    if path in ("", "(top level)"):
        return str(key)
    return f"{path}.{key}"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _alts(allowed: tuple[str, ...] | list[str]) -> str:
    return ", ".join(allowed)


def _did_you_mean(key: Any, allowed) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- loading


def _shipped_dir():
    return resources.files("moe_ep") / "configs"


def shipped_configs() -> dict[str, str]:
    """Name -> path of the configs installed with the package (`cpu-local`, ...)."""
    root = _shipped_dir()
    out = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = str(entry)
    return out


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML tree (dicts, lists, scalars) into a `Config`."""
    names, aliases = _registry_names()
    return _Parser(source, names, aliases).config(data)


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in shipped:
        return Path(shipped[stem])
    if path.exists():
        raise ConfigError(str(path), "", "is not a file")
    raise ConfigError(str(path), "", f"no such file, and not a shipped config name "
                                     f"(shipped: {_alts(list(shipped))})")


def load_config(name_or_path: str | Path) -> Config:
    """Load a YAML config from a path, or a shipped one by name (`"cpu-local"`)."""
    path = _resolve(name_or_path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, where, f"invalid YAML: {problem}") from exc
    return parse_config(data, source)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The YAML tree of `config` (inverse of `parse_config`; defaults are written out)."""

    def rule(r: Rule, with_when: bool) -> dict[str, Any] | str:
        if not with_when and not r.options:
            return r.use
        out: dict[str, Any] = {}
        if with_when:
            when = {}
            for f in dataclasses.fields(When):
                value = getattr(r.when, f.name)
                if value is not None:
                    when[f.name] = value.to_yaml() if isinstance(value, IntRange) else value
            out["when"] = when
        out["use"] = r.use
        if r.options:
            out["options"] = {k: list(v) if isinstance(v, tuple) else v
                              for k, v in r.options.items()}
        return out

    a2a: dict[str, Any] = {}
    if config.all2all.rules:
        a2a["rules"] = [rule(r, True) for r in config.all2all.rules]
    if config.all2all.fallback:
        a2a["fallback"] = [rule(r, False) for r in config.all2all.fallback]
    a2a["strict"] = config.all2all.strict
    out: dict[str, Any] = {}
    if config.description:
        out["description"] = config.description
    out["parallel"] = dataclasses.asdict(config.parallel)
    out["collectives"] = dataclasses.asdict(config.collectives)
    out["all2all"] = a2a
    return out


def dump_config(config: Config) -> str:
    """YAML text of `config`; `parse_config(yaml.safe_load(dump_config(c))) == c`."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------- selection


def select(
    config: Config,
    topology: Topology,
    phase: str | None = None,
    *,
    availability: Mapping[str, tuple[bool, str]]
    | Callable[[Topology], Mapping[str, tuple[bool, str]]]
    | None = None,
) -> Selection:
    """Choose the manager for `topology` and `phase` (prefill | decode | None = unknown).

    Rules are tried in order: the first whose `when` holds and whose backend is available
    wins; then the fallback list in order. `availability` maps backend name -> (ok, reason)
    (default: the registry's `available_managers(topology)`); it is the only input besides
    the config, topology and phase, so the function is pure given it.

    Raises SelectionError when nothing is available, or (with `strict: true`) when a rule
    matches but its backend is unavailable.
    """
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be one of {_alts(PHASES)} or None, got {phase!r}")
    if availability is None:
        availability = _default_availability(topology)
    elif callable(availability):
        availability = availability(topology)

    def unavailable(name: str) -> str | None:
        ok, reason = availability.get(name, (False, "not registered in this installation"))
        return None if ok else (reason or "unavailable")

    skipped: list[tuple[Rule, str]] = []
    for rule in config.all2all.rules:
        why = rule.when.mismatch(topology, phase)
        if why is not None:
            skipped.append((rule, f"does not match: {why}"))
            continue
        why = unavailable(rule.use)
        if why is not None:
            if config.all2all.strict:
                raise SelectionError(
                    f"{config.source}: {rule.where}: matches this topology but backend "
                    f"{rule.use!r} is unavailable: {why} (strict: true forbids falling back)")
            skipped.append((rule, f"matches, but {rule.use} is unavailable: {why}"))
            continue
        return _selected(config, phase, rule, skipped)
    for rule in config.all2all.fallback:
        why = unavailable(rule.use)
        if why is not None:
            skipped.append((rule, f"{rule.use} is unavailable: {why}"))
            continue
        return _selected(config, phase, rule, skipped)
    details = "; ".join(f"{r.where} ({r.describe()}): {why}" for r, why in skipped)
    raise SelectionError(f"{config.source}: no rule or fallback selects an available backend "
                         f"for {_describe_topology(topology)}, phase {phase}: {details}")


def _selected(config: Config, phase: str | None, rule: Rule,
              skipped: list[tuple[Rule, str]]) -> Selection:
    logger.info("config %s, phase %s: %s selects %s (%d entries skipped)", config.source, phase,
                rule.where, rule.describe(), len(skipped))
    return Selection(rule.use, rule.options, rule, tuple(skipped))


def _describe_topology(topology: Topology) -> str:
    return (f"device {topology.device}, world size {topology.world_size}, "
            f"{topology.num_nodes} node(s)")


def build_manager_from_config(
    path_or_config: str | Path | Config,
    group: GroupCoordinator,
    phase: str | None = None,
    *,
    topology: Topology | None = None,
):
    """Build the manager a config selects for `group`. Collective over `group`.

    Detects the topology of `group` (unless given), selects, then checks that every rank
    chose the same backend and options, because ranks that build different managers would
    hang in their first dispatch; a disagreement raises SelectionError on every rank.
    """
    from moe_ep.distributed.topology import Topology
    from moe_ep.managers.registry import build_manager

    config = path_or_config if isinstance(path_or_config, Config) \
        else load_config(path_or_config)
    if topology is None:
        topology = Topology.detect(group)
    error = None
    choice: tuple[str, tuple] | None = None
    try:
        selection = select(config, topology, phase)
        choice = (selection.name, tuple(selection.options.items()))
    except SelectionError as exc:
        error = str(exc)
    choices = group.all_gather_object((choice, error)) if group.world_size > 1 \
        else [(choice, error)]
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(choices) if e is not None]
    if errors:
        raise SelectionError("; ".join(errors))
    if len({c for c, _ in choices}) != 1:
        seen = ", ".join(f"rank {r}: {c[0]}" for r, (c, _) in enumerate(choices))
        raise SelectionError(f"{config.source}: ranks selected different managers ({seen}); "
                             f"their topologies or installed packages differ")
    return build_manager(selection.name, group, **dict(selection.options))
