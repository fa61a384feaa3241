"""Manifest loading: YAML -> ${vars} -> extends -> merge -> overrides -> validated Plan."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from attnlab.config.base import validate_section
from attnlab.config.data import DataConfig
from attnlab.config.model import ModelConfig
from attnlab.config.cache import CacheConfig
from attnlab.config.train import TrainConfig
from attnlab.errors import ConfigError
from attnlab.manifest import (
    Plan, ResolvedRun, apply_overrides, deep_merge, load_plan, load_plan_from_dict, parse_yaml,
)

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "manifests.md"

TINY_MODEL = {
    "vocab_size": 256, "d_model": 64, "block_size": 32, "num_layers": 2,
    "attention": {"type": "standard", "num_heads": 4},
}


def manifest(**top) -> dict:
    """A minimal valid manifest; keyword arguments replace top-level keys."""
    data = {
        "version": 1,
        "name": "t",
        "model": copy.deepcopy(TINY_MODEL),
        "train": {"steps": 10},
        "groups": [{"name": "g", "runs": [{"id": "r"}]}],
    }
    data.update(top)
    return data


def one_run(runs: list[dict], **top) -> dict:
    return manifest(groups=[{"name": "g", "runs": runs}], **top)


def plan(data: dict, overrides=(), group=None, base_dir: Path = FIXTURES) -> Plan:
    return load_plan_from_dict(data, base_dir, overrides=overrides, group=group)


def error(data: dict, overrides=(), group=None, base_dir: Path = FIXTURES) -> str:
    with pytest.raises(ConfigError) as info:
        plan(data, overrides, group, base_dir)
    text = str(info.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------ vars
def test_vars_native_values():
    data = manifest(vars={"d": 128, "flag": True, "betas": [0.8, 0.9], "attn": {"type": "standard", "num_heads": 8}})
    data["model"].update(d_model="${d}", tie_embeddings="${flag}", attention="${attn}")
    data["train"]["betas"] = "${betas}"
    run = plan(data).runs[0]
    assert run.model.d_model == 128 and run.model.tie_embeddings is True
    assert run.model.attention.num_heads == 8
    assert run.train.betas == [0.8, 0.9]


def test_vars_interpolated_as_text():
    data = manifest(vars={"d": 64, "flag": False, "lr": 0.001, "who": "dba"})
    data["groups"][0]["runs"][0]["description"] = "${who} d=${d} tied=${flag} lr=${lr}"
    assert plan(data).runs[0].description == "dba d=64 tied=false lr=0.001"


def test_vars_reference_other_vars():
    data = manifest(vars={"base": 32, "d": "${base}", "name": "w${d}", "shape": {"d_model": "${d}"}})
    data["model"]["d_model"] = "${shape}"  # a dict var where an int is expected: a clear error
    assert "model.d_model" in error(data)
    data["model"]["d_model"] = "${d}"
    data["groups"][0]["runs"][0]["description"] = "${name}"
    p = plan(data)
    assert p.runs[0].model.d_model == 32 and p.runs[0].description == "w32"
    assert p.vars == {"base": 32, "d": 32, "name": "w32", "shape": {"d_model": 32}}


def test_vars_escape_is_literal_and_not_resubstituted():
    data = manifest(vars={"lit": "$${d}", "d": 1})
    data["groups"][0]["runs"][0]["description"] = "cost $${x} and ${lit}"
    assert plan(data).runs[0].description == "cost ${x} and ${d}"


def test_undefined_var_names_path_and_var():
    data = manifest(vars={"d": 64})
    data["groups"][0]["runs"][0]["model"] = {"d_model": "${dmodel}"}
    msg = error(data)
    assert msg.startswith("groups[0](g).runs[0](r).model.d_model: undefined variable 'dmodel'")
    assert "'${dmodel}'" in msg and "defined: d" in msg


def test_undefined_var_inside_vars():
    assert error(manifest(vars={"a": "${b}x"})).startswith("vars.a: undefined variable 'b'")


def test_cyclic_vars():
    msg = error(manifest(vars={"a": "${b}", "b": "x${c}", "c": "${a}"}))
    assert "cyclic variable reference: a -> b -> c -> a" in msg


@pytest.mark.parametrize("text, expect", [
    ("x${lst}", "variable 'lst' holds a list"),
    ("x${a b}", "invalid variable reference '${a b}'"),
    ("x${open", "unterminated '${'"),
])
def test_bad_interpolation(text, expect):
    data = manifest(vars={"lst": [1]}, description=text)
    msg = error(data)
    assert msg.startswith("description: ") and expect in msg


def test_bad_var_names_and_block():
    assert error(manifest(vars={"d-model": 1})).startswith("vars.d-model: variable names")
    assert error(manifest(vars=[1, 2])).startswith("vars: expected a mapping")


# ------------------------------------------------------------------ extends
def test_extends_multiple_relative_paths():
    p = load_plan(FIXTURES / "child.yml")
    assert p.name == "child" and [r.key for r in p.runs] == ["g/a", "g/b"]
    a, b = p.runs
    assert a.model.d_model == 128  # the file's vars beat the base's
    assert a.model.attention.num_heads == 4  # from base/shape.yml
    assert a.train.lr == 1e-3 and a.train.batch_size == 2  # from base/train.yml (1e-3 is a float)
    assert (a.train.steps, b.train.steps) == (10, 20)


def test_extends_recursive():
    run = load_plan(FIXTURES / "recursive.yml").runs[0]
    assert (run.model.attention.num_heads, run.model.num_layers, run.model.d_model) == (8, 3, 64)
    assert run.train.steps == 5


def test_extends_cycle_names_the_chain():
    with pytest.raises(ConfigError) as info:
        load_plan(FIXTURES / "cycle" / "top.yml")
    assert re.search(r"extends: cycle: \S*a\.yml -> \S*b\.yml -> \S*a\.yml", str(info.value))


def test_extends_missing_file_and_bad_value():
    msg = error(manifest(extends=["base/shape.yml", "nope/missing.yml"]))
    assert msg.startswith("extends[1]: file not found: ") and "missing.yml" in msg
    assert error(manifest(extends=3)).startswith("extends: expected a path or a list of paths")


def test_extends_from_dict_resolves_against_base_dir():
    data = {"version": 1, "name": "x", "extends": "base/shape.yml", "train": {"steps": 1},
            "groups": [{"name": "g", "runs": [{"id": "r"}]}]}
    assert plan(data, base_dir=FIXTURES).runs[0].model.d_model == 64
    assert "file not found" in error(data, base_dir=FIXTURES / "cycle")


def test_extended_file_with_unknown_key_names_the_file(tmp_path):
    (tmp_path / "base.yml").write_text("trian: {steps: 3}\n")
    msg = error(manifest(extends="base.yml"), base_dir=tmp_path)
    assert msg.startswith("trian: unknown top-level key in ") and "base.yml" in msg


# ------------------------------------------------------------------ deep merge
def test_deep_merge_rules():
    base = {"a": {"x": 1, "y": [1, 2]}, "att": {"type": "standard", "head_dim": 16, "num_heads": 4}}
    over = {"a": {"y": [3], "z": None}, "att": {"type": "decoupled", "sem_dim": 8}}
    out = deep_merge(base, over)
    assert out == {"a": {"x": 1, "y": [3], "z": None}, "att": {"type": "decoupled", "sem_dim": 8}}
    assert deep_merge(base, {"att": {"type": "standard", "num_heads": 8}})["att"] == {
        "type": "standard", "head_dim": 16, "num_heads": 8}
    assert base["a"] == {"x": 1, "y": [1, 2]}  # inputs untouched


def test_run_section_merges_over_top_level():
    run = plan(one_run([{"id": "r", "model": {"attention": {"num_kv_heads": 2}}, "train": {"lr": 0.01}}])).runs[0]
    assert run.model.attention.num_heads == 4 and run.model.attention.kv_heads == 2
    assert run.train.steps == 10 and run.train.lr == 0.01


def test_type_switch_replaces_instead_of_merging():
    data = one_run([{"id": "dba", "model": {"attention": {"type": "decoupled", "num_heads": 4,
                                                         "sem_dim": 16, "geo_dim": 32}}}])
    data["model"]["attention"]["head_dim"] = 16  # a standard-only key must not leak into decoupled
    run = plan(data).runs[0]
    assert run.model.attention.type == "decoupled" and run.model.attention.geo_dim == 32


# ------------------------------------------------------------------ overrides
def test_overrides_types_and_precedence():
    data = one_run([{"id": "r", "train": {"steps": 20}}])
    run = plan(data, ["train.steps=200", "train.compile=true", "train.betas=[0.8, 0.9]",
                      "train.grad_clip=null", "train.lr=1e-4", "model.attention.num_kv_heads=2"]).runs[0]
    assert run.train.steps == 200 and run.train.compile is True and run.train.betas == [0.8, 0.9]
    assert run.train.grad_clip is None and run.train.lr == pytest.approx(1e-4)
    assert run.model.attention.kv_heads == 2


def test_override_applies_to_every_run():
    data = one_run([{"id": "a"}, {"id": "b", "train": {"steps": 3}}])
    assert [r.train.steps for r in plan(data, ["train.steps=7"]).runs] == [7, 7]


def test_vars_override_changes_derived_values():
    data = manifest(vars={"d": 64, "sem": "${d}"})
    data["model"]["d_model"] = "${d}"
    data["groups"][0]["runs"][0]["description"] = "width ${sem}"
    run = plan(data, ["vars.d=128"]).runs[0]
    assert run.model.d_model == 128 and run.description == "width 128"
    assert plan(manifest(), ["vars.new=1"]).vars == {"new": 1}


def test_run_override_values_see_vars():
    data = manifest(vars={"d": 96})
    data["model"]["num_layers"] = 1
    assert plan(data, ["model.d_model=${d}"]).runs[0].model.d_model == 96


def test_defaults_out_dir_override(tmp_path):
    run = plan(manifest(), [f"defaults.out_dir={tmp_path}/x"]).runs[0]
    assert run.run_dir == tmp_path / "x" / "t" / "g" / "r"


def test_override_replaces_a_whole_mapping():
    run = plan(manifest(), ["model.attention={type: bottleneck, num_heads: 4, attn_dim: 32}"]).runs[0]
    assert run.model.attention.type == "bottleneck"


@pytest.mark.parametrize("override, expect", [
    ("train.steps", "override 'train.steps': expected key=value"),
    ("=3", "override '=3': empty key"),
    ("train..steps=3", "empty component"),
    ("optim.lr=3", "unknown first component 'optim'; expected one of: vars, defaults, model, data, train"),
    ("train=3", "name a key inside 'train'"),
    ("train.steps.x=1", "cannot set 'x': 'train.steps' is not a mapping (got 10)"),
    ("model.vocab_size=[1", "value is not valid YAML"),
])
def test_malformed_overrides(override, expect):
    assert expect in error(manifest(), [override])


def test_apply_overrides_helper():
    tree = {"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}
    out = apply_overrides(tree, ["a.c.d=true", "l.1.x=5", "a.b=[1, 2]"])
    assert out == {"a": {"b": [1, 2], "c": {"d": True}}, "l": [{"x": 1}, {"x": 5}]}
    assert tree == {"a": {"b": 1}, "l": [{"x": 1}, {"x": 2}]}
    with pytest.raises(ConfigError, match="index 9 is out of range"):
        apply_overrides(tree, ["l.9.x=1"])
    with pytest.raises(ConfigError, match="'a.b' is not a mapping"):
        apply_overrides(tree, ["a.b.c=1"])


# ------------------------------------------------------------------ user errors
def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yml: manifest file not found"):
        load_plan(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match=r"syntax_error\.yml:5:14: YAML syntax error: mapping values"):
        load_plan(FIXTURES / "syntax_error.yml")
    with pytest.raises(ConfigError, match=r"not_mapping\.yml: top level must be a mapping .* got a list"):
        load_plan(FIXTURES / "not_mapping.yml")
    with pytest.raises(ConfigError, match=r"duplicate_key\.yml:4:1: YAML syntax error: duplicate key 'train'"):
        load_plan(FIXTURES / "duplicate_key.yml")
    (tmp_path / "empty.yml").write_text("# nothing\n")
    with pytest.raises(ConfigError, match="file is empty"):
        load_plan(tmp_path / "empty.yml")
    with pytest.raises(ConfigError, match="found a directory"):
        load_plan(tmp_path)


def test_vars_in_flow_collections_are_quoted():
    assert parse_yaml("a: {b: '${x}', c: ['${y}']}\n", "f.yml") == {"a": {"b": "${x}", "c": ["${y}"]}}
    # unquoted, the braces are YAML syntax: a one-line error with line:column
    with pytest.raises(ConfigError, match=r"^f\.yml:1:\d+: YAML syntax error"):
        parse_yaml("a: {b: ${x}}\n", "f.yml")


def test_yaml_floats_and_dates():
    assert parse_yaml("a: 1e-4\nb: 1.0e3\nc: 2024-01-02\nd: 3\n", "x") == {
        "a": 1e-4, "b": 1000.0, "c": "2024-01-02", "d": 3}


def test_unknown_top_level_key():
    msg = error(manifest(bogus=3))
    assert msg.startswith("bogus: unknown top-level key") and "expected one of: version, name" in msg
    assert msg.endswith("(got 3)")


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d["train"].update(steps="ten"),
     "groups[0](g).runs[0](r).train.steps: Input should be a valid integer (got 'ten')"),
    (lambda d: d["model"].pop("vocab_size"), "groups[0](g).runs[0](r).model.vocab_size: required key is missing"),
    (lambda d: d["train"].pop("steps"), "groups[0](g).runs[0](r).train.steps: required key is missing"),
    (lambda d: d["model"]["attention"].update(nmu_heads=2), "model.attention.nmu_heads: unknown key (got 2)"),
    (lambda d: d["groups"][0]["runs"][0].update(mode="teleport"), "groups[0](g).runs[0](r).mode: Input should be 'train'"),
    (lambda d: d["groups"][0]["runs"][0].update(mode="upcycle"), "groups[0](g).runs[0](r).teacher: mode 'upcycle' needs 'teacher'"),
    (lambda d: d["groups"][0]["runs"][0].update(mode="finetune", teacher="run:x", init_from="run:x"),
     "groups[0](g).runs[0](r).model: mode 'finetune' derives the model"),
    (lambda d: d["groups"][0].update(benchmarks=[{"type": "latency", "repeats": 0}]),
     "groups[0](g).benchmarks[0].repeats: Input should be greater than 0 (got 0)"),
    (lambda d: d["groups"][0].update(benchmarks=[{"type": "warp"}]), "groups[0](g).benchmarks[0]: Input tag 'warp'"),
    (lambda d: d["groups"][0].update(benchmarks=[{"type": "memory"}, {"type": "memory"}]),
     "groups[0](g).benchmarks[1].id: duplicate benchmark name"),
    (lambda d: d["groups"][0]["runs"][0].pop("id"), "groups[0](g).runs[0].id: required key is missing"),
    (lambda d: d["groups"][0]["runs"][0].update(id="a b"), "groups[0](g).runs[0](a b).id: String should match pattern"),
    (lambda d: d["groups"][0].update(name=".."), "groups[0](..).name: must not consist of dots only"),
    (lambda d: d["groups"][0].update(runs=[]), "groups[0](g).runs: List should have at least 1 item"),
    (lambda d: d["groups"][0]["runs"].append({"id": "r"}), "groups[0](g).runs[1](r).id: duplicate run id in group 'g' (also runs[0]) (got 'r')"),
    (lambda d: d["groups"].append({"name": "g", "runs": [{"id": "x"}]}), "groups[1](g).name: duplicate group name (also groups[0]) (got 'g')"),
    (lambda d: d.update(groups=[]), "groups: List should have at least 1 item"),
    (lambda d: d.pop("groups"), "groups: required key is missing"),
    (lambda d: d.pop("name"), "name: required key is missing"),
    (lambda d: d.update(name="my run"), "name: String should match pattern"),
    (lambda d: d.pop("version"), "version: required key is missing"),
    (lambda d: d.update(version=2), "version: unsupported manifest version; this attnlab reads version 1 (got 2)"),
    (lambda d: d.update(version="1"), "version: unsupported manifest version; this attnlab reads version 1 (got '1')"),
    (lambda d: d.update(defaults={"outdir": "x"}), "defaults.outdir: unknown key (got 'x')"),
    (lambda d: d.update(train=[1]), "train: Input should be a valid dictionary"),
    (lambda d: d["groups"][0]["runs"][0].update(model=3), "groups[0](g).runs[0](r).model: Input should be a valid dictionary (got 3)"),
    (lambda d: d["model"].update({1: 2}), "model: mapping keys must be strings (got 1)"),
])
def test_user_errors_name_path_and_value(mutate, expect):
    data = manifest()
    mutate(data)
    assert expect in error(data)


def test_garbage_anywhere_is_a_config_error():
    """No user input may surface as a raw KeyError/TypeError/AttributeError."""
    junk = [None, 0, "x", [], [1], {}, {"a": 1}, True, "${nope}"]
    base = manifest(vars={"v": 1})
    spots = [(), ("model",), ("model", "attention"), ("train",), ("data",), ("groups",), ("groups", 0),
             ("groups", 0, "runs"), ("groups", 0, "runs", 0), ("groups", 0, "runs", 0, "model"), ("vars",),
             ("defaults",), ("name",), ("description",), ("extends",)]
    for spot in spots:
        for value in junk:
            data = copy.deepcopy(base)
            if not spot:
                with pytest.raises(ConfigError):
                    plan(value)
                continue
            node = data
            for key in spot[:-1]:
                node = node[key]
            node[spot[-1]] = copy.deepcopy(value)
            try:
                plan(data)
            except ConfigError as err:
                assert "\n" not in str(err)


# ------------------------------------------------------------------ groups and layout
def test_group_selection():
    p = load_plan(FIXTURES / "compare.yml", group="gqa")
    assert [r.key for r in p.runs] == ["gqa/kv2"] and p.runs[0].model.attention.kv_heads == 2
    assert [r.key for r in load_plan(FIXTURES / "compare.yml").runs] == ["compare/baseline", "compare/dba", "gqa/kv2"]
    with pytest.raises(ConfigError) as info:
        load_plan(FIXTURES / "compare.yml", group="nope")
    assert str(info.value) == ("--group: no group named 'nope' in manifest 'compare'; "
                               "available: compare, gqa (got 'nope')")


def test_run_dir_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = load_plan(FIXTURES / "compare.yml")
    assert p.source == FIXTURES / "compare.yml" and p.overrides == []
    assert [r.run_dir for r in p.runs] == [tmp_path / "runs" / "compare" / g / i
                                          for g, i in [("compare", "baseline"), ("compare", "dba"), ("gqa", "kv2")]]
    dba = p.runs[1]
    assert isinstance(dba, ResolvedRun)
    assert (dba.name, dba.group, dba.run_id, dba.key, dba.description) == ("compare", "compare", "dba", "compare/dba", "decoupled")
    assert p.description == "baseline vs DBA on a tiny shape"


def test_resolved_round_trips_through_json():
    p = load_plan(FIXTURES / "compare.yml", overrides=["train.lr=1e-3"])
    for run in p.runs:
        again = json.loads(json.dumps(run.resolved))
        assert again == run.resolved and set(again) == {"model", "data", "train", "cache", "run"}
        assert validate_section(ModelConfig, again["model"], "m") == run.model
        assert validate_section(DataConfig, again["data"], "d") == run.data
        assert validate_section(TrainConfig, again["train"], "t") == run.train
        assert validate_section(CacheConfig, again["cache"], "c") == run.cache
    json.dumps(p.to_dict())


# ------------------------------------------------------------------ impossible shapes
@pytest.mark.parametrize("model, expect", [
    ({"attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 18, "geo_dim": 16}},
     "groups[0](g).runs[0](r).model.attention: sem_dim=18 is not divisible by num_heads=4"),
    ({"attention": {"type": "standard", "num_heads": 4, "num_kv_heads": 3}},
     "groups[0](g).runs[0](r).model.attention: num_heads=4 is not a multiple of num_kv_heads=3"),
    ({"attention": {"type": "bottleneck", "num_heads": 4, "attn_dim": 64}},
     "groups[0](g).runs[0](r).model: bottleneck attn_dim=64 must be smaller than d_model=64"),
    ({"d_model": 40, "attention": {"type": "standard", "num_heads": 8}},
     "groups[0](g).runs[0](r).model: RoPE needs an even head_dim, got 5"),
    ({"attention": {"type": "decoupled", "num_heads": 4, "sem_dim": 16, "geo_dim": 12}},
     "groups[0](g).runs[0](r).model.attention: RoPE needs an even geo_dim/num_heads, got 3"),
    ({"attention": {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 16, "geo_dim": 16,
                    "tie_qk": True}},
     "groups[0](g).runs[0](r).model.attention: tie_qk needs num_kv_heads == num_heads"),
])
def test_impossible_shapes(model, expect):
    assert expect in error(one_run([{"id": "r", "model": model}]))


# ------------------------------------------------------------------ docs stay true
def _doc_text() -> str:
    return DOCS.read_text(encoding="utf-8")


def test_docs_mention_every_config_field():
    from attnlab.config import attention, cache, data, manifest as mcfg, model, train, upcycle, verify
    from attnlab.config.bench import WikitextBench
    from attnlab.nn.attention.attamba import AttambaAttentionConfig
    from attnlab.nn.attention.butterfly import ButterflyAttentionConfig
    from attnlab.nn.attention.mla import MLAAttentionConfig
    from attnlab.nn.attention.sliding_window import SlidingWindowAttentionConfig
    classes = [MLAAttentionConfig, ButterflyAttentionConfig, AttambaAttentionConfig, SlidingWindowAttentionConfig,
               WikitextBench, upcycle.RetrofitConfig, attention.StandardAttentionConfig, attention.BottleneckAttentionConfig,
               attention.DecoupledAttentionConfig, attention.RopeConfig, attention.Llama3RopeScaling,
               model.ModelConfig, model.MLPConfig, model.LayerOverride, model.BlockNode, model.AttentionNode,
               model.MLPNode, model.NormNode, model.SequentialNode, model.ResidualNode, model.ParallelNode,
               model.RepeatNode, data.DataConfig, data.TokenizerConfig, data.RetrievalMix, train.TrainConfig, cache.CacheConfig,
               upcycle.SurgeryConfig, upcycle.DistillConfig, upcycle.TeacherSamples, verify.VerifyConfig,
               verify.VerifyCase, verify.Thresholds,
               mcfg.ManifestSpec, mcfg.GroupSpec, mcfg.RunSpec, mcfg.ManifestDefaults]
    text = _doc_text()
    missing = [f"{c.__name__}.{f}" for c in classes for f in c.model_fields if f"`{f}`" not in text]
    assert not missing, f"docs/manifests.md does not mention {missing}"


def test_docs_examples_are_valid():
    blocks = re.findall(r"```yaml\n(.*?)```", _doc_text(), flags=re.S)
    full = [b for b in blocks if b.startswith("version: 1")]
    assert len(full) >= 2
    for block in full:
        p = plan(parse_yaml(block, "docs"))
        assert p.runs


def test_data_path_resolves_relative_to_the_manifest(tmp_path, monkeypatch, capsys):
    import os

    from attnlab.manifest import check_data_paths, load_plan

    sub = tmp_path / "configs"
    (sub / "data").mkdir(parents=True)
    (sub / "data" / "c.txt").write_text("x" * 100)
    (sub / "base.yml").write_text("data: {source: text, path: data/c.txt, tokenizer: {type: byte}}\n")
    (sub / "m.yml").write_text(
        "version: 1\nname: t\nextends: base.yml\n"
        "model: {vocab_size: 256, d_model: 32, num_layers: 1, block_size: 16,\n"
        "        attention: {type: standard, num_heads: 4}}\n"
        "train: {steps: 2, batch_size: 2}\n"
        "groups: [{name: g, runs: [{id: a}, {id: b, data: {path: ./data/../data/c.txt}}]}]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = load_plan(sub / "m.yml")
    assert [r.data.path for r in plan.runs] == [str(sub / "data" / "c.txt")] * 2
    check_data_paths(plan)
    # a command-line override is relative to the working directory
    (elsewhere / "o.txt").write_text("y" * 100)
    plan = load_plan(sub / "m.yml", ["data.path=o.txt"])
    assert os.path.abspath(plan.runs[0].data.path) == str(elsewhere / "o.txt")
    # absolute and ~ paths are kept
    plan = load_plan(sub / "m.yml", [f"data.path={sub / 'data' / 'c.txt'}"])
    assert plan.runs[0].data.path == str(sub / "data" / "c.txt")


def test_data_path_missing_is_one_line_naming_key_and_resolved_path(tmp_path):
    from attnlab.errors import ConfigError
    from attnlab.manifest import check_data_paths, load_plan

    (tmp_path / "m.yml").write_text(
        "version: 1\nname: t\ndata: {source: tokens, path: tok/x.npy}\n"
        "model: {vocab_size: 256, d_model: 32, num_layers: 1, block_size: 16,\n"
        "        attention: {type: standard, num_heads: 4}}\n"
        "train: {steps: 2, batch_size: 2}\ngroups: [{name: g, runs: [{id: a}]}]\n")
    plan = load_plan(tmp_path / "m.yml")
    with pytest.raises(ConfigError) as info:
        check_data_paths(plan)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("groups(g).runs(a).data.path: ")
    assert str(tmp_path / "tok" / "x.npy") in msg and "manifest" in msg


def test_data_path_cwd_fallback_warns(tmp_path, monkeypatch, capsys):
    from attnlab.manifest import resolve_data_path

    (tmp_path / "only_here.txt").write_text("z")
    monkeypatch.chdir(tmp_path)
    out = resolve_data_path("only_here.txt", tmp_path / "cfg")
    assert out == str(tmp_path / "only_here.txt") and "relative to the working directory" in capsys.readouterr().err
    assert resolve_data_path("nope.txt", tmp_path / "cfg") == str(tmp_path / "cfg" / "nope.txt")


# ---------------------------------------------------------------- seeds
def _seeded(**second):
    model = {"vocab_size": 256, "d_model": 32, "num_layers": 1, "block_size": 32,
             "attention": {"type": "standard", "num_heads": 2}}
    runs = [{"id": "teacher", "seeds": [0, 3], "model": model}, {"id": "student", "mode": "retrofit",
             "teacher": "run:teacher", "retrofit": {"window": 8, "block_size": 8}, **second}]
    return {"version": 1, "name": "s", "data": {"source": "embedded"}, "train": {"steps": 2, "batch_size": 2},
            "groups": [{"name": "g", "runs": runs}]}


def test_seeds_expand_into_one_run_per_seed_with_paired_teachers():
    p = plan(_seeded(seeds=[0, 3]))
    assert [r.run_id for r in p.runs] == ["teacher-s0", "teacher-s3", "student-s0", "student-s3"]
    assert [r.train.seed for r in p.runs[:2]] == [0, 3]
    assert [r.teacher for r in p.runs[2:]] == ["run:teacher-s0", "run:teacher-s3"]
    assert {r.resolved["run"]["arm"] for r in p.runs} == {"teacher", "student"}


def test_seed_errors_name_the_key():
    assert "name one of run:teacher-s0, run:teacher-s3" in error(_seeded())
    assert "name one of" in error(_seeded(seeds=[0, 1]))  # seed 1 has no teacher copy
    assert "seeds" in error(_seeded(seeds=[2, 2]))
    assert "seeds" in error(_seeded(seeds=[]))
