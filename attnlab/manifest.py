"""Manifest YAML -> validated ``Plan`` of runs.

Pipeline (every step raises ``ConfigError`` naming the key path and value):

1. read YAML (safe loader; duplicate keys are errors, ``1e-4`` is a float, dates stay strings);
2. expand ``extends`` recursively: the listed files are deep-merged in order *underneath* the file;
3. apply ``vars.*`` / ``defaults.*`` overrides;
4. resolve ``vars`` (they may reference each other) and substitute ``${name}`` everywhere else;
5. check the skeleton (``attnlab.config.manifest.ManifestSpec``);
6. per run: deep-merge the top-level ``model``/``data``/``train`` under the run's own, apply the
   ``model.*``/``data.*``/``train.*`` overrides, validate as ``ModelConfig``/``DataConfig``/
   ``TrainConfig``.

Format reference: docs/manifests.md.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from attnlab.config.base import validate_section
from attnlab.config.data import DataConfig
from attnlab.config.manifest import SECTIONS, TOP_LEVEL_KEYS, ManifestSpec, item_label, parse_manifest
from attnlab.config.model import ModelConfig
from attnlab.config.variants import stored_fields
from attnlab.config.bench import validate_benchmarks
from attnlab.config.cache import CacheConfig
from attnlab.config.upcycle import DistillConfig, RetrofitConfig, SurgeryConfig
from attnlab.config.verify import VerifyConfig
from attnlab.config.train import TrainConfig
from attnlab.errors import ConfigError

__all__ = [
    "Plan", "ResolvedRun", "apply_overrides", "check_data_paths", "deep_merge", "load_plan",
    "load_plan_from_dict", "parse_override", "parse_yaml", "resolve_data_path",
]

PRE_OVERRIDE_ROOTS = ("vars", "defaults")  # applied before ${vars} resolution
RUN_OVERRIDE_ROOTS = SECTIONS  # applied to every resolved run after its merge


# ------------------------------------------------------------------ result types
@dataclass(frozen=True)
class ResolvedRun:
    name: str  # manifest name
    group: str
    run_id: str
    description: str
    model: ModelConfig          # for import/upcycle: derived from the teacher (shapes; weights decide the rest)
    data: DataConfig
    train: TrainConfig | None   # None for modes that do not train (import, upcycle)
    cache: CacheConfig
    run_dir: Path  # <out_dir>/<name>/<group>/<run_id>
    resolved: dict  # {"model": ..., "data": ..., "train": ..., "cache": ..., "run": {mode, ...}}: JSON-able
    mode: str = "train"
    teacher: str | None = None      # a model source path, or "run:<id>" of an earlier run in the group
    init_from: str | None = None
    surgery: SurgeryConfig | None = None
    retrofit: RetrofitConfig | None = None
    distill: DistillConfig | None = None
    verify: VerifyConfig | None = None

    @property
    def key(self) -> str:
        return f"{self.group}/{self.run_id}"


@dataclass(frozen=True)
class Plan:
    name: str
    source: Path | None
    runs: list[ResolvedRun]
    overrides: list[str]
    description: str = ""
    vars: dict = field(default_factory=dict)  # resolved ${vars}
    benchmarks: dict = field(default_factory=dict)  # group name -> [BenchConfig] (run after training)

    def group_runs(self, group: str) -> list[ResolvedRun]:
        return [r for r in self.runs if r.group == group]

    def to_dict(self) -> dict:
        """JSON-able summary (what ``attnlab compile --print-plan`` shows)."""
        return {
            "name": self.name,
            "description": self.description,
            "source": str(self.source) if self.source is not None else None,
            "overrides": list(self.overrides),
            "vars": copy.deepcopy(self.vars),
            "benchmarks": {g: [b.model_dump(mode="json") for b in bs] for g, bs in self.benchmarks.items()},
            "runs": [
                {"key": r.key, "description": r.description, "run_dir": str(r.run_dir), **copy.deepcopy(r.resolved)}
                for r in self.runs
            ],
        }


# ------------------------------------------------------------------ YAML
#: bounds on what one YAML text may hold, checked while parsing (before anything is built)
MAX_YAML_BYTES = 8 << 20          # characters of one manifest file or override value
MAX_YAML_DEPTH = 100              # nesting of mappings/lists, aliases followed
MAX_YAML_NODES = 250_000          # nodes once every alias (and << merge) is expanded
MAX_VAR_DEPTH = 64                # ${a} -> ${b} -> ... chain length
MAX_VAR_TEXT = 1 << 20            # characters of one interpolated string
MAX_TREE_NODES = 250_000          # nodes produced by ${vars} substitution over a whole manifest


class _YamlLimitError(Exception):
    """A YAML text over one of the limits above (``mark``: where, if known)."""

    def __init__(self, message: str, mark=None):
        super().__init__(message)
        self.message = message
        self.mark = mark


def _node_children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_graph(root) -> None:
    """Expanded size and depth of a composed node graph (aliases share nodes, so a few bytes
    can stand for billions of nodes), and recursive aliases; iterative, memoized: linear in
    the composed graph, whatever it expands to."""
    memo: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            open_nodes.discard(nid)
            kids = _node_children(node)
            size = 1 + sum(memo[id(k)][0] for k in kids)
            height = 1 + max((memo[id(k)][1] for k in kids), default=0)
            if size > MAX_YAML_NODES:
                raise _YamlLimitError(f"the document expands to more than {MAX_YAML_NODES:,} nodes once its "
                                      "aliases are expanded (an alias bomb?)", node.start_mark)
            if height > MAX_YAML_DEPTH:
                raise _YamlLimitError(f"nesting deeper than {MAX_YAML_DEPTH} levels once aliases are expanded",
                                      node.start_mark)
            memo[nid] = (size, height)
            continue
        if nid in memo:
            continue
        open_nodes.add(nid)
        stack.append((node, True))
        for kid in _node_children(node):
            if id(kid) in open_nodes:
                raise _YamlLimitError("recursive alias: a node contains an alias to itself", kid.start_mark)
            if id(kid) not in memo:
                stack.append((kid, False))


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` plus: duplicate mapping keys are errors, YAML 1.2 floats (``1e-4``,
    ``1.0e3``) are floats rather than strings, dates stay strings, and the size limits above
    (nesting depth, alias expansion, recursive aliases) hold before anything is constructed."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlLimitError(f"nesting deeper than {MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_graph(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable key: the base constructor reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    if len(text) > MAX_YAML_BYTES:
        raise _YamlLimitError(f"{len(text):,} characters; the limit is {MAX_YAML_BYTES:,}")
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _limit_error(err: _YamlLimitError, where: str) -> ConfigError:
    mark = err.mark
    loc = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    return ConfigError(loc, "YAML too large or too deep: " + err.message, show_value=False)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text; a syntax error becomes ``ConfigError('<where>:<line>:<col>', ...)``.

    ``${name}`` needs no quotes, also inside ``{...}``/``[...]``."""
    try:
        return _load_yaml(text)
    except _YamlLimitError as err:
        raise _limit_error(err, where) from None
    except RecursionError:  # a limit above should always come first; never a traceback
        raise ConfigError(where, "YAML nested too deeply", show_value=False) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        loc = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        message = err.problem or "invalid YAML"
        if err.context:
            message += f" ({err.context}"
            cm = err.context_mark
            message += f" at line {cm.line + 1}, column {cm.column + 1})" if cm else ")"
        raise ConfigError(loc, "YAML syntax error: " + " ".join(message.split()),
                          show_value=False) from None
    except yaml.YAMLError as err:
        raise ConfigError(where, "YAML error: " + " ".join(str(err).split()), show_value=False) from None


def _read_file(path: Path, shown: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(shown, "manifest file not found", show_value=False) from None
    except IsADirectoryError:
        raise ConfigError(shown, "expected a manifest file, found a directory", show_value=False) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(shown, f"cannot read manifest: {err}", show_value=False) from None
    return parse_yaml(text, shown)


def _shown_value(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _check_keys(node: Any, path: str, key: str | None = None, depth: int = 0) -> None:
    """Every mapping key in a manifest is a string (YAML would allow ``1:`` or ``on:``); the
    tree is at most ``MAX_YAML_DEPTH`` deep (also for a mapping passed in from Python)."""
    if depth > MAX_YAML_DEPTH and isinstance(node, (dict, list)):
        raise ConfigError(path, f"nested deeper than {MAX_YAML_DEPTH} levels (or a mapping that contains itself)",
                          show_value=False)
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigError(path, "mapping keys must be strings", k)
            _check_keys(v, _join(path, k), k, depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_keys(v, f"{path}{item_label(key, i, v)}", None, depth + 1)


def _check_depth(tree: Any) -> None:
    """At most ``MAX_YAML_DEPTH`` levels of mappings/lists (a mapping that contains itself
    counts as too deep), checked iteratively; the error names the path where it got too deep."""
    stack: list[tuple[Any, str, int]] = [(tree, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth >= MAX_YAML_DEPTH:
            raise ConfigError(path, f"nested deeper than {MAX_YAML_DEPTH} levels (or a mapping that contains itself)",
                              show_value=False)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, (dict, list)):
                stack.append((value, f"{path}[{key}]" if isinstance(node, list) else _join(path, key), depth + 1))


def _check_top(tree: Any, shown: str) -> dict:
    if tree is None:
        raise ConfigError(shown, "file is empty; expected a mapping of manifest keys", show_value=False)
    if not isinstance(tree, dict):
        raise ConfigError(shown, f"top level must be a mapping of manifest keys, got a {type(tree).__name__}",
                          show_value=False)
    _check_keys(tree, "")
    for key, value in tree.items():
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(key, f"unknown top-level key in {shown}; expected one of: {', '.join(TOP_LEVEL_KEYS)}",
                              value, show_value=_shown_value(value))
    return tree


# ------------------------------------------------------------------ extends + deep merge
def deep_merge(base: Any, over: Any) -> Any:
    """``over`` merged onto ``base`` (both left untouched). Mappings merge recursively; lists and
    scalars are replaced. Two mappings whose ``type`` keys differ do not merge: ``over`` replaces
    ``base`` (switching ``attention.type`` must not keep the other variant's keys)."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return copy.deepcopy(over)
    if "type" in base and "type" in over and base["type"] != over["type"]:
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if key in out else copy.deepcopy(value)
    return out


_Chain = tuple[tuple[Path, str], ...]  # (resolved path, shown path) of the files being expanded


MAX_EXTENDS_FILES = 256  # distinct files one manifest may extend, directly or not


def _load_file(path: Path, shown: str, chain: _Chain, memo: dict | None = None) -> dict:
    """``path`` read and its ``extends`` expanded; ``memo`` (resolved path -> expanded tree) reads
    each file once per plan, so a diamond of files extending each other twice stays linear."""
    memo = {} if memo is None else memo
    real = path.resolve()
    names = [s for r, s in chain]
    for i, (r, _) in enumerate(chain):
        if r == real:
            raise ConfigError("extends", "cycle: " + " -> ".join(names[i:] + [shown]), show_value=False)
    if real in memo:
        return memo[real]
    if len(memo) + len(chain) >= MAX_EXTENDS_FILES:
        raise ConfigError("extends", f"more than {MAX_EXTENDS_FILES} files extended (in {shown})", show_value=False)
    tree = _check_top(_read_file(path, shown), shown)
    memo[real] = _expand_extends(tree, path.parent, chain + ((real, shown),), shown, memo)
    return memo[real]


def _expand_extends(tree: dict, base_dir: Path, chain: _Chain, shown: str, memo: dict | None = None) -> dict:
    tree = dict(tree)
    ext = tree.pop("extends", None)
    if ext is None:
        return tree
    paths = [ext] if isinstance(ext, str) else ext
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError("extends", f"expected a path or a list of paths (in {shown})", ext)
    merged: dict = {}
    for i, rel in enumerate(paths):
        target = Path(os.path.expanduser(rel))
        if not target.is_absolute():
            target = base_dir / target
        target_shown = os.path.normpath(target)
        if not target.is_file():
            raise ConfigError(f"extends[{i}]", f"file not found: {target_shown} (in {shown})", rel)
        merged = deep_merge(merged, _load_file(target, target_shown, chain, memo))
    return deep_merge(merged, tree)


# ------------------------------------------------------------------ ${vars}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REF = re.compile(r"\$(\$?)\{([^}]*)\}")  # ${name}, or $${...} (escaped)


def _count_nodes(tree: Any) -> int:
    """Values in a tree (every mapping, list and scalar is one), iteratively."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


class _Vars:
    """Resolves the ``vars`` block (eagerly, so errors in unused vars surface too) and
    substitutes ``${name}`` in any tree."""

    def __init__(self, raw: Any):
        if not isinstance(raw, dict):
            raise ConfigError("vars", "expected a mapping of variable names to values", raw,
                              show_value=_shown_value(raw))
        for name in raw:
            if not _IDENT.fullmatch(name):
                raise ConfigError(f"vars.{name}", "variable names must match [A-Za-z_][A-Za-z0-9_]*",
                                  show_value=False)
        self.raw = raw
        self.values: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}  # nodes in each resolved value
        self._stack: list[str] = []
        self._budget = MAX_TREE_NODES  # nodes substitution may still produce (``${a}`` copies a var's tree)
        for name in raw:
            self._lookup(name, f"vars.{name}", "")

    def _lookup(self, name: str, path: str, text: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name not in self.raw:
            defined = f"defined: {', '.join(self.raw)}" if self.raw else "no vars are defined"
            raise ConfigError(path, f"undefined variable '{name}' ({defined})", text)
        if name in self._stack:
            cycle = self._stack[self._stack.index(name):] + [name]
            raise ConfigError(f"vars.{cycle[0]}", "cyclic variable reference: " + " -> ".join(cycle),
                              show_value=False)
        if len(self._stack) >= MAX_VAR_DEPTH:
            chain = " -> ".join(self._stack[:3] + ["..."] + self._stack[-2:] + [name])
            raise ConfigError(f"vars.{self._stack[0]}", f"variable references nest deeper than {MAX_VAR_DEPTH} "
                              f"levels ({chain})", show_value=False)
        self._stack.append(name)
        try:
            value = self.substitute(self.raw[name], f"vars.{name}")
        finally:
            self._stack.pop()
        self.values[name] = value
        self._sizes[name] = _count_nodes(value)
        return value

    def _charge(self, nodes: int, path: str) -> None:
        self._budget -= nodes
        if self._budget < 0:
            raise ConfigError(path, f"${{vars}} substitution would produce more than {MAX_TREE_NODES:,} values "
                              "(variables that copy each other exponentially?)", show_value=False)

    def substitute(self, node: Any, path: str, key: str | None = None) -> Any:
        self._charge(1, path)
        if isinstance(node, dict):
            return {k: self.substitute(v, _join(path, k), k) for k, v in node.items()}
        if isinstance(node, list):
            return [self.substitute(v, f"{path}{item_label(key, i, v)}") for i, v in enumerate(node)]
        if isinstance(node, str) and "$" in node:
            return self._string(node, path)
        return node

    def _ref_name(self, inner: str, path: str, text: str) -> str:
        if not _IDENT.fullmatch(inner):
            raise ConfigError(path, f"invalid variable reference '${{{inner}}}'", text)
        return inner

    def _string(self, text: str, path: str) -> Any:
        whole = _REF.fullmatch(text)
        if whole and not whole.group(1):  # exactly ${name}: the var's native value
            name = self._ref_name(whole.group(2), path, text)
            value = self._lookup(name, path, text)
            self._charge(self._sizes.get(name, 1), path)
            return copy.deepcopy(value)
        pieces: list[str] = []
        pos = 0
        length = 0
        for m in _REF.finditer(text):
            pieces.append(self._literal(text[pos:m.start()], path, text))
            if m.group(1):
                pieces.append("${" + m.group(2) + "}")
            else:
                name = self._ref_name(m.group(2), path, text)
                pieces.append(self._as_text(self._lookup(name, path, text), name, path, text))
            length += len(pieces[-2]) + len(pieces[-1])
            if length > MAX_VAR_TEXT:
                raise ConfigError(path, f"the interpolated string would exceed {MAX_VAR_TEXT:,} characters",
                                  show_value=False)
            pos = m.end()
        pieces.append(self._literal(text[pos:], path, text))
        return "".join(pieces)

    @staticmethod
    def _literal(piece: str, path: str, text: str) -> str:
        if "${" in piece:
            raise ConfigError(path, "unterminated '${' (write '$${' for a literal '${')", text)
        return piece

    @staticmethod
    def _as_text(value: Any, name: str, path: str, text: str) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        kind = "null" if value is None else type(value).__name__
        raise ConfigError(path, f"variable '{name}' holds a {kind}; only strings, numbers and booleans "
                                "can be interpolated into a longer string", text)


# ------------------------------------------------------------------ dotted overrides
@dataclass(frozen=True)
class Override:
    text: str
    keys: tuple[str, ...]
    value: Any


def parse_override(text: str) -> Override:
    """``a.b.c=value``; the value is parsed as YAML (``200`` int, ``true`` bool, ``[1,2]`` list,
    ``null`` None, ``1e-4`` float)."""
    where = f"override {text!r}"
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(where, "expected key=value, e.g. train.steps=200", show_value=False)
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(where, "empty key; expected key=value, e.g. train.steps=200", show_value=False)
    keys = tuple(part.strip() for part in key.split("."))
    if not all(keys):
        raise ConfigError(where, f"empty component in key '{key}'", show_value=False)
    try:
        value = _load_yaml(raw)
    except _YamlLimitError as err:
        raise _limit_error(err, where) from None
    except RecursionError:
        raise ConfigError(where, "value nested too deeply", show_value=False) from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(where, "value is not valid YAML: " + " ".join(problem.split()), show_value=False) from None
    return Override(text, keys, value)


def _apply_parsed(tree: dict, overrides: Sequence[Override]) -> dict:
    for ov in overrides:
        node: Any = tree
        value = copy.deepcopy(ov.value)
        for depth, key in enumerate(ov.keys):
            last = depth == len(ov.keys) - 1
            if isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, {})
            elif isinstance(node, list) and key.isdigit():
                index = int(key)
                if index >= len(node):
                    raise ConfigError(f"override {ov.text!r}", f"index {index} is out of range for "
                                      f"'{'.'.join(ov.keys[:depth])}' (a list of {len(node)})", show_value=False)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            else:
                where = ".".join(ov.keys[:depth]) or "<root>"
                raise ConfigError(f"override {ov.text!r}", f"cannot set '{key}': '{where}' is not a mapping",
                                  node, show_value=_shown_value(node))
    return tree


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``tree`` with each dotted ``key=value`` set (missing mappings are created; a
    numeric component indexes into a list)."""
    return _apply_parsed(copy.deepcopy(tree), [parse_override(o) for o in overrides])


def _split_overrides(overrides: Sequence[str]) -> tuple[list[Override], list[Override]]:
    roots = PRE_OVERRIDE_ROOTS + RUN_OVERRIDE_ROOTS
    pre, post = [], []
    for text in overrides:
        ov = parse_override(text)
        if ov.keys[0] not in roots:
            raise ConfigError(f"override {text!r}", f"unknown first component '{ov.keys[0]}'; "
                              f"expected one of: {', '.join(roots)}", show_value=False)
        if len(ov.keys) < 2:
            raise ConfigError(f"override {text!r}", f"name a key inside '{ov.keys[0]}', "
                              "e.g. train.steps=200", show_value=False)
        (pre if ov.keys[0] in PRE_OVERRIDE_ROOTS else post).append(ov)
    return pre, post


# ------------------------------------------------------------------ plan
def load_plan(path: str | Path, overrides: Sequence[str] = (), group: str | None = None) -> Plan:
    """Read a manifest file and resolve it into a validated ``Plan``."""
    path = Path(path)
    shown = str(path)
    tree = _load_file(path, shown, ())
    return _build_plan(tree, overrides, group, path.absolute(), path.absolute().parent)


def load_plan_from_dict(data: dict, base_dir: str | Path, overrides: Sequence[str] = (),
                        group: str | None = None, source: str | Path | None = None) -> Plan:
    """Like ``load_plan`` for an already-parsed manifest; ``extends`` resolves against ``base_dir``."""
    source = Path(source).absolute() if source is not None else None
    shown = str(source) if source is not None else "<manifest>"
    _check_depth(data)  # before copy.deepcopy, which recurses
    tree = _check_top(copy.deepcopy(data), shown)
    chain: _Chain = ((source.resolve(), shown),) if source is not None else ()
    tree = _expand_extends(tree, Path(base_dir), chain, shown)
    return _build_plan(tree, overrides, group, source, Path(base_dir).absolute())


def _build_plan(tree: dict, overrides: Sequence[str], group: str | None, source: Path | None,
                base_dir: Path | None = None) -> Plan:
    pre, post = _split_overrides(overrides)
    for key in PRE_OVERRIDE_ROOTS:
        if tree.get(key) is None:
            tree[key] = {}
    tree = _apply_parsed(tree, pre)
    variables = _Vars(tree.pop("vars"))
    tree = variables.substitute(tree, "")
    tree["vars"] = variables.values
    post = [Override(o.text, o.keys, variables.substitute(o.value, f"override {o.text!r}")) for o in post]
    spec = parse_manifest(tree)

    names = [g.name for g in spec.groups]
    if group is not None and group not in names:
        raise ConfigError("--group", f"no group named '{group}' in manifest '{spec.name}'; "
                          f"available: {', '.join(names)}", group)
    out_root = Path(spec.defaults.out_dir).expanduser()
    if not out_root.is_absolute():
        out_root = Path.cwd() / out_root

    context = {"limits": spec.defaults.limits}
    base_dir = base_dir if base_dir is not None else Path.cwd()
    runs = [run for gi in range(len(spec.groups))
            for run in _resolve_group(spec, gi, post, out_root, context, base_dir)]
    benchmarks = {}
    for gi, g in enumerate(spec.groups):
        where = f"groups[{gi}]({g.name}).benchmarks"
        benchmarks[g.name] = validate_benchmarks(g.benchmarks, where, context)
        _check_benchmarks(benchmarks[g.name], [r for r in runs if r.group == g.name], where)
    if group is not None:
        runs = [r for r in runs if r.group == group]
        benchmarks = {group: benchmarks[group]}
    return Plan(spec.name, source, runs, list(overrides), spec.description, dict(spec.vars), benchmarks)


def _check_benchmarks(benches: list, runs: list[ResolvedRun], where: str) -> None:
    """What a benchmark spec needs from its group, checked before any training: its name is a
    safe file name, distinct in the group; a ``run:<id>`` reference names a run of the group; and
    each cache policy names only fields every run's attention stores."""
    from attnlab.cache.policy import CachePolicy

    from attnlab.paths import check_name

    ids = [r.run_id for r in runs]
    names: dict[str, int] = {}
    for i, bench in enumerate(benches):
        check_name(bench.name, f"{where}[{i}].id")  # it names the benchmark's record file
        if bench.name in names:
            raise ConfigError(f"{where}[{i}].id", f"{where}[{names[bench.name]}] has the same name (their records "
                              "would overwrite each other); give them distinct ids", bench.name)
        names[bench.name] = i
        ref = getattr(bench, "reference", None)
        if isinstance(ref, str) and ref.startswith("run:") and ref[4:] not in ids:
            raise ConfigError(f"{where}[{i}].reference", f"no run {ref[4:]!r} in this group (runs: {', '.join(ids)})",
                              ref)
        texts = [(f"policies[{j}]", t) for j, t in enumerate(getattr(bench, "policies", None) or [])]
        if getattr(bench, "policy", None) is not None:
            texts.append(("policy", bench.policy))
        for key, text in texts:
            policy = CachePolicy.parse(text)
            for run in runs:
                have = stored_fields(run.model.layer_dims())
                missing = [name for name in policy.formats if name not in have]
                if missing:
                    raise ConfigError(f"{where}[{i}].{key}", f"names cache field {missing[0]!r}, which run "
                                      f"{run.run_id!r} does not store (its fields: {', '.join(sorted(have))})", text)


def _check_seq_len(model: ModelConfig, train: TrainConfig | None, mode: str, prefix: str) -> None:
    """A training run's ``seq_len`` fits the model's ``block_size`` (the run would refuse it
    at start; upcycling modes clamp it to block_size instead)."""
    seq_len = train.seq_len if train is not None else None
    if mode == "train" and seq_len is not None and seq_len > model.block_size:
        raise ConfigError(f"{prefix}.train.seq_len", f"exceeds model.block_size={model.block_size} "
                          "(the longest sequence one forward pass accepts)", seq_len)


def _check_cache_fields(cache: CacheConfig, model: ModelConfig, path: str) -> None:
    """A cache section may only name fields some attention layer of the model stores."""
    dims = model.layer_dims()
    have = stored_fields(dims)
    for name, fmt in cache.fields.items():
        if name not in have:
            raise ConfigError(f"{path}.{name}", f"this model's attention stores no {name!r} field "
                              f"(its fields: {', '.join(sorted(have))})", fmt)
    for j, override in enumerate(cache.layers):
        where = f"{path}.layers[{j}]"
        missing = [i for i in override.layers if i >= len(dims)]
        if missing:
            raise ConfigError(f"{where}.layers", f"layer {missing[0]} does not exist (the model has {len(dims)} "
                              f"attention layers, 0..{len(dims) - 1})", override.layers)
        layer_fields = stored_fields([dims[i] for i in override.layers])
        for name, fmt in override.fields.items():
            if name not in layer_fields:
                raise ConfigError(f"{where}.{name}", f"layers {override.layers} store no {name!r} field "
                                  f"(their fields: {', '.join(sorted(layer_fields))})", fmt)


def _source_config(ref: str, where: str, earlier: dict[str, ModelConfig]) -> ModelConfig:
    """Model config of ``run:<id>`` (an earlier run of the group) or of a source path."""
    if ref.startswith("run:"):
        run_id = ref[4:]
        if run_id not in earlier:
            raise ConfigError(where, f"refers to run {run_id!r}, which is not an earlier run of this group "
                              f"(earlier: {', '.join(earlier) or 'none'})", ref)
        return earlier[run_id]
    from attnlab.convert.sources import source_model_config

    return source_model_config(ref, where)


def _resolve_mode(run, sections: dict, prefix: str, earlier: dict[str, ModelConfig], context: dict | None = None):
    """(model config, train config | None, surgery, retrofit, distill) for the run's mode."""
    mode = run.mode
    needs = {"import": ("teacher",), "upcycle": ("teacher", "surgery"), "blockwise": ("teacher", "init_from"),
             "finetune": ("teacher", "init_from"), "retrofit": ("teacher", "retrofit"), "train": ()}[mode]
    for key in needs:
        if getattr(run, key) is None:
            raise ConfigError(f"{prefix}.{key}", f"mode {mode!r} needs '{key}'", show_value=False)
    for key in ("teacher", "init_from", "surgery", "retrofit"):
        if key not in needs and getattr(run, key) is not None and not (key == "teacher" and mode == "train"):
            raise ConfigError(f"{prefix}.{key}", f"mode {mode!r} takes no '{key}'", getattr(run, key))
    surgery = validate_section(SurgeryConfig, run.surgery, f"{prefix}.surgery") if run.surgery is not None else None
    retrofit = (validate_section(RetrofitConfig, run.retrofit, f"{prefix}.retrofit")
                if run.retrofit is not None else None)
    distill = validate_section(DistillConfig, run.distill, f"{prefix}.distill")
    if mode == "train":
        model = validate_section(ModelConfig, sections["model"], f"{prefix}.model", context)
    else:
        if sections["model"]:
            raise ConfigError(f"{prefix}.model", f"mode {mode!r} derives the model from its "
                              f"{'init_from' if mode in ('blockwise', 'finetune') else 'teacher'}; remove 'model'",
                              show_value=False)
        if mode in ("blockwise", "finetune"):
            model = _source_config(run.init_from, f"{prefix}.init_from", earlier)
        else:
            model = _source_config(run.teacher, f"{prefix}.teacher", earlier)
        if mode == "upcycle":
            model = _student_config(model, surgery, f"{prefix}.surgery")
        if mode == "retrofit":
            model = _retrofit_config(model, retrofit, f"{prefix}.retrofit")
    train = None
    if mode in ("train", "blockwise", "finetune"):
        train = validate_section(TrainConfig, sections["train"], f"{prefix}.train", context)
    return model, train, surgery, retrofit, distill


def _retrofit_config(teacher: ModelConfig, retrofit: RetrofitConfig, where: str) -> ModelConfig:
    """The retrofitted model's config; a refused retrofit is a one-line error under ``where``."""
    from attnlab.convert.butterfly import retrofit_config

    try:
        return retrofit_config(teacher, **retrofit.options())
    except ConfigError as err:
        raise ConfigError(where, str(err), show_value=False) from None


def _student_config(teacher: ModelConfig, surgery: SurgeryConfig, where: str) -> ModelConfig:
    """The upcycled student's shape; refuses a plan whose KV cache would not shrink."""
    from attnlab.convert.surgery import student_config
    from attnlab.model.stats import kv_bytes_per_token_layer

    student = student_config(teacher, surgery.plan())
    for i, (t, s) in enumerate(zip(teacher.attention_specs(), student.attention_specs())):
        t_bytes = kv_bytes_per_token_layer(t.dims(teacher.d_model), "fp16")
        s_bytes = kv_bytes_per_token_layer(s.dims(student.d_model), "fp16")
        if s_bytes >= t_bytes:
            raise ConfigError(where, f"layer {i}: the student's KV cache ({s_bytes} B/token fp16) would not be "
                              f"smaller than the teacher's ({t_bytes}); lower sem_head_dim/geo_pairs/v_rank",
                              show_value=False)
    return student


def resolve_data_path(value: Any, base_dir: Path) -> Any:
    """A manifest's ``data.path``: ``~`` expanded; a relative path joined to ``base_dir`` (the
    manifest's folder, as for ``extends``). Transition: when only the working-directory reading
    exists, that one is used, with a one-line warning."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    resolved = Path(os.path.normpath(base_dir / path))
    old = Path(os.path.normpath(Path.cwd() / path))
    if not resolved.exists() and old.exists() and old != resolved:
        import sys

        print(f"warning: data.path {value!r} is resolved relative to the manifest ({base_dir}) and is not "
              f"there; using {old} (relative to the working directory) for now: write it relative to the "
              "manifest", file=sys.stderr, flush=True)
        return str(old)
    return str(resolved)


def _check_mix_length(data: DataConfig, model: ModelConfig, train, prefix: str) -> None:
    """A ``retrieval_mix`` document (length + 1 tokens) is exactly one training window."""
    window = train.seq_len if train is not None and train.seq_len else model.block_size
    if data.retrieval_mix.length != window:
        which = "train.seq_len" if train is not None and train.seq_len else "model.block_size"
        raise ConfigError(f"{prefix}.data.retrieval_mix.length", f"must equal the training window ({which} = "
                          f"{window}) so that every window is one whole document", data.retrieval_mix.length)


def check_data_paths(plan: Plan) -> None:
    """``ConfigError`` (one line, naming the key and the resolved path) for the first run whose
    ``data.path`` (sources ``tokens``/``text``/``retrieval_mix``) does not exist."""
    for run in plan.runs:
        if run.data.source in ("tokens", "text", "retrieval_mix") and run.data.path and not Path(run.data.path).exists():
            raise ConfigError(f"groups({run.group}).runs({run.run_id}).data.path",
                              f"{run.data.path} does not exist (a relative data.path resolves against "
                              f"the manifest's folder); prepare it with `attnlab prepare` or fix the path",
                              show_value=False)


def _resolve_group(spec: ManifestSpec, gi: int, post: list[Override], out_root: Path,
                   context: dict | None = None, base_dir: Path | None = None) -> list[ResolvedRun]:
    group = spec.groups[gi]
    out = []
    earlier: dict[str, ModelConfig] = {}
    for ri, run in enumerate(group.runs):
        prefix = f"groups[{gi}]({group.name}).runs[{ri}]({run.id})"
        sections = {s: deep_merge(getattr(spec, s), getattr(run, s)) for s in SECTIONS}
        if isinstance(sections.get("data"), dict) and "path" in sections["data"]:  # overrides: cwd-relative
            sections["data"]["path"] = resolve_data_path(sections["data"]["path"], base_dir or Path.cwd())
        sections = _apply_parsed(sections, post)
        model, train, surgery, retrofit, distill = _resolve_mode(run, sections, prefix, earlier, context)
        data = validate_section(DataConfig, sections["data"], f"{prefix}.data")
        if data.source == "teacher" and run.teacher is None:
            raise ConfigError(f"{prefix}.data.source", "'teacher' samples need the run's 'teacher'", "teacher")
        if data.source == "retrieval_mix":
            _check_mix_length(data, model, train, prefix)
        cache = validate_section(CacheConfig, sections["cache"], f"{prefix}.cache")
        _check_cache_fields(cache, model, f"{prefix}.cache")
        verify = validate_section(VerifyConfig, run.verify, f"{prefix}.verify") if run.verify is not None else None
        _check_seq_len(model, train, run.mode, prefix)
        resolved = {s: (cfg.model_dump(mode="json") if cfg is not None else None)
                    for s, cfg in zip(SECTIONS, (model, data, train, cache))}
        resolved["run"] = {"mode": run.mode, "teacher": run.teacher, "init_from": run.init_from,
                           "surgery": surgery.model_dump(mode="json") if surgery else None,
                           "retrofit": retrofit.model_dump(mode="json") if retrofit else None,
                           "distill": distill.model_dump(mode="json"),
                           "verify": verify.model_dump(mode="json") if verify else None}
        if run.arm is not None:  # one seed of a seeded run: reports aggregate its arm
            resolved["run"]["arm"] = run.arm
        earlier[run.id] = model
        out.append(ResolvedRun(
            name=spec.name, group=group.name, run_id=run.id, description=run.description,
            model=model, data=data, train=train, cache=cache,
            run_dir=out_root / spec.name / group.name / run.id, resolved=resolved,
            mode=run.mode, teacher=run.teacher, init_from=run.init_from, surgery=surgery,
            retrofit=retrofit, distill=distill, verify=verify,
        ))
    return out
