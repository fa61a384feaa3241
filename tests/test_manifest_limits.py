"""Hostile manifests fail at `attnlab compile` within a second or two, as one line (exit 2), before
anything proportional to them is built: YAML alias bombs, deep nesting, recursive aliases, long
and exponential ${var} chains, absurd sizes, non-finite floats, and benchmark specs / seq_len that
used to fail only after training (issue 11)."""

import copy
import time
from pathlib import Path

import pytest
import yaml

from attnlab.cli import main
from attnlab.errors import ConfigError
from attnlab.manifest import (MAX_VAR_DEPTH, MAX_YAML_DEPTH, load_plan, load_plan_from_dict, parse_override,
                              parse_yaml)

BASE = """\
version: 1
name: h
model:
  vocab_size: 256
  d_model: 64
  num_layers: 2
  block_size: 64
  attention: {type: standard, num_heads: 4}
train: {steps: 10}
groups:
  - name: g
    runs: [{id: a}, {id: b}]
"""
GROUPS = "groups: [{name: g, runs: [{id: a}]}]\n"


def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yml"
    path.write_text(text)
    return path


def _fails(fn, *args, **kwargs) -> str:
    """The call raises a one-line ConfigError in under 2 s; returns its text."""
    start = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        fn(*args, **kwargs)
    assert time.perf_counter() - start < 2.0
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def _compile_fails(tmp_path, text, capsys, *overrides) -> str:
    path = _manifest(tmp_path, text)
    start = time.perf_counter()
    assert main(["compile", str(path), *overrides]) == 2
    assert time.perf_counter() - start < 2.0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------ YAML loading limits
def _billion_laughs() -> str:
    lines = ["version: 1", "name: bomb", "vars:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"  {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n" + GROUPS


def test_billion_laughs_fails_at_once(tmp_path, capsys):
    text = _billion_laughs()
    assert len(text) < 700  # a ~600-byte file standing for 9^9 strings
    err = _compile_fails(tmp_path, text, capsys)
    assert "alias" in err and "250,000 nodes" in err


def test_merge_key_bomb_fails_at_once():
    lines = ["a0: &a0 {k0: 1}"] + [f"a{i}: &a{i} {{<<: [*a{i-1}, *a{i-1}], k{i}: 1}}" for i in range(1, 40)]
    assert "nodes once its aliases are expanded" in _fails(parse_yaml, "\n".join(lines), "m.yml")


def test_mapping_alias_bomb_fails_at_once():
    text = "a: &a {x: 1, y: 1}\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} {{x: *{chr(97 + i)}, y: *{chr(97 + i)}, z: *{chr(97 + i)}}}\n" for i in range(20))
    assert "alias bomb" in _fails(parse_yaml, text, "m.yml")


def test_shared_aliases_below_the_limit_still_work():
    tree = parse_yaml("a: &a [1, 2, 3]\nb: *a\nc: {<<: {x: 1}, y: 2}\n", "m.yml")
    assert tree == {"a": [1, 2, 3], "b": [1, 2, 3], "c": {"x": 1, "y": 2}}


@pytest.mark.parametrize("opener,closer", [("[", "]"), ("{a: ", "}")])
def test_3000_deep_nesting_is_one_line(tmp_path, capsys, opener, closer):
    text = "version: 1\nname: d\nvars: {x: " + opener * 3000 + "1" + closer * 3000 + "}\n" + GROUPS
    err = _compile_fails(tmp_path, text, capsys)
    assert f"nesting deeper than {MAX_YAML_DEPTH} levels" in err and "m.yml:3:" in err


def test_block_style_deep_nesting_is_one_line():
    text = "".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "v: 1\n"
    assert "nesting deeper" in _fails(parse_yaml, text, "m.yml")


def test_depth_via_aliases_is_counted():
    # each anchor nests the previous one: 2 levels as written, 150 once the aliases are followed
    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} [*a{i-1}]" for i in range(1, 150)]
    assert "once aliases are expanded" in _fails(parse_yaml, "\n".join(lines), "m.yml")


@pytest.mark.parametrize("body", ["  x: &x [*x]\n", "  x: &x {a: *x}\n", "  x: &x {a: [1, {b: *x}]}\n"])
def test_recursive_alias_is_one_line(tmp_path, capsys, body):
    err = _compile_fails(tmp_path, "version: 1\nname: r\nvars:\n" + body + GROUPS, capsys)
    assert "recursive alias" in err


def test_override_values_have_the_same_limits():
    assert "nesting deeper" in _fails(parse_override, "train.x=" + "[" * 3000 + "]" * 3000)
    assert "recursive alias" in _fails(parse_override, "train.x=&a [*a]")


def test_too_much_text():
    assert "characters; the limit is" in _fails(parse_yaml, "x: " + "a" * (9 << 20), "m.yml")


def test_self_containing_dict_from_python_is_one_line(tmp_path):
    tree = yaml.safe_load(BASE)
    loop: dict = {}
    loop["me"] = loop
    tree["vars"] = {"x": loop}
    assert "nested deeper" in _fails(load_plan_from_dict, tree, tmp_path)


# ------------------------------------------------------------------ ${vars} limits
def test_1000_long_var_chain_is_one_line(tmp_path, capsys):
    chain = "".join(f"  v{i}: ${{v{i + 1}}}\n" for i in range(1000)) + "  v1000: 1\n"
    err = _compile_fails(tmp_path, "version: 1\nname: c\nvars:\n" + chain + GROUPS, capsys)
    assert f"nest deeper than {MAX_VAR_DEPTH} levels" in err and "v0 -> v1" in err


def test_var_chain_within_the_limit_resolves(tmp_path):
    chain = "".join(f"  v{i}: ${{v{i + 1}}}\n" for i in range(40)) + "  v40: 64\n"
    text = BASE.replace("d_model: 64", "d_model: ${v0}").replace("version: 1\n", "version: 1\nvars:\n" + chain)
    assert load_plan(_manifest(tmp_path, text)).runs[0].model.d_model == 64


def test_exponential_string_vars_fail_fast(tmp_path):
    body = "".join(f'  v{i + 1}: "${{v{i}}}${{v{i}}}"\n' for i in range(60))
    text = "version: 1\nname: c\nvars:\n  v0: x\n" + body + GROUPS
    assert "interpolated string would exceed" in _fails(load_plan, _manifest(tmp_path, text))


def test_exponential_list_vars_fail_fast(tmp_path):
    body = "".join(f'  v{i + 1}: ["${{v{i}}}", "${{v{i}}}"]\n' for i in range(60))
    text = "version: 1\nname: c\nvars:\n  v0: x\n" + body + GROUPS
    assert "substitution would produce more than" in _fails(load_plan, _manifest(tmp_path, text))


# ------------------------------------------------------------------ sizes and numbers at compile
@pytest.mark.parametrize("override,expect", [
    ("model.num_layers=1000000000", "model.num_layers: num_layers=1000000000 exceeds the limit of 4096"),
    ("model.d_model=100000000000000000000000", "model.d_model: integer does not fit in 64 bits"),
    ("train.seed=100000000000000000000000", "train.seed: integer does not fit in 64 bits"),
    ("model.vocab_size=1000000000", "model.vocab_size: vocab_size=1000000000 exceeds"),
    ("model.block_size=1000000000000", "model.block_size: block_size=1000000000000 exceeds"),
    ("train.lr=.inf", "train.lr: must be a finite number"),
    ("train.lr=.nan", "train.lr: must be a finite number"),
    ("train.weight_decay=.inf", "train.weight_decay: must be a finite number"),
    ("train.grad_clip=.nan", "train.grad_clip: must be a finite number"),
    ("train.eps=-.inf", "train.eps: must be a finite number"),
    ("model.init_std=.inf", "model.init_std: must be a finite number"),
    ("model.norm_eps=.nan", "model.norm_eps: must be a finite number"),
    ("model.attention.rope.theta=.inf", "model.attention.rope.theta: must be a finite number"),
    ("model.attention.rope.inv_freq=[1.0,.nan,1.0,1.0,1.0,1.0,1.0,1.0]",
     "model.attention.rope.inv_freq[1]: must be a finite number"),
    ("train.seq_len=65", "train.seq_len: exceeds model.block_size=64"),
])
def test_compile_refuses(tmp_path, capsys, override, expect):
    err = _compile_fails(tmp_path, BASE, capsys, override)
    assert f"groups[0](g).runs[0](a).{expect}" in err, err


@pytest.mark.parametrize("topology", [
    "{type: repeat, count: 1000000000, body: {type: block}}",
    "{type: repeat, count: 1e9, body: {type: block}}",
    "{type: repeat, count: 4000, body: {type: repeat, count: 4000, body: {type: block}}}",
])
def test_compile_refuses_huge_repeats(tmp_path, capsys, topology):
    err = _compile_fails(tmp_path, BASE, capsys, "model.num_layers=null", f"model.topology={topology}")
    assert "groups[0](g).runs[0](a).model" in err


def test_limits_are_configurable_in_the_manifest(tmp_path):
    path = _manifest(tmp_path, BASE)
    assert "exceeds the limit of 1 " in _fails(load_plan, path, ["defaults.limits.max_layers=1"])
    assert "parameters, over the limit of 1K" in _fails(load_plan, path, ["defaults.limits.max_params=1000"])
    assert "defaults.limits.bogus: unknown key" in _fails(load_plan, path, ["defaults.limits.bogus=1"])
    plan = load_plan(path, ["model.num_layers=5000", "defaults.limits.max_layers=5000"])
    assert plan.runs[0].model.num_layers == 5000


def test_limits_from_the_environment(tmp_path, monkeypatch):
    path = _manifest(tmp_path, BASE)
    monkeypatch.setenv("ATTNLAB_MAX_LAYERS", "1")
    assert "ATTNLAB_MAX_LAYERS" in _fails(load_plan, path)
    # the manifest wins over the environment
    assert len(load_plan(path, ["defaults.limits.max_layers=2"]).runs) == 2


def test_attention_type_may_be_omitted(tmp_path):
    text = BASE.replace("attention: {type: standard, num_heads: 4}", "attention: {num_heads: 4}")
    plan = load_plan(_manifest(tmp_path, text))
    assert plan.runs[0].resolved["model"]["attention"]["type"] == "standard"


# ------------------------------------------------------------------ benchmark specs at compile
@pytest.mark.parametrize("spec,expect", [
    ("{type: perplexity, policies: [q9_9]}", "benchmarks[0].policies[0]: 'q9_9' is not a valid cache policy"),
    ("{type: perplexity, policies: ['k_sem=q4_0']}", "benchmarks[0].policies[0]: names cache field 'k_sem'"),
    ("{type: latency, policy: 'k_geo=q8_0'}", "benchmarks[0].policy: names cache field 'k_geo'"),
    ("{type: memory, contexts: [-5]}", "benchmarks[0].contexts[0]: must be >= 1"),
    ("{type: context_sweep, lengths: [0]}", "benchmarks[0].lengths[0]: must be >= 1"),
    ('{type: quality, reference: "run:missing"}', "benchmarks[0].reference: no run 'missing' in this group"),
])
def test_benchmark_specs_fail_at_compile(tmp_path, capsys, spec, expect):
    text = BASE + f"    benchmarks: [{spec}]\n"
    err = _compile_fails(tmp_path, text, capsys)
    assert f"groups[0](g).{expect}" in err, err


def test_valid_benchmarks_still_compile(tmp_path):
    text = BASE + ('    benchmarks: [{type: perplexity, policies: [fp16, "k=q8_0,v=q4_0"]},'
                   ' {type: quality, reference: "run:a", policy: q8_0}, {type: latency, gen_lengths: [0]}]\n')
    plan = load_plan(_manifest(tmp_path, text))
    assert [b.type for b in plan.benchmarks["g"]] == ["perplexity", "quality", "latency"]


def test_seq_len_equal_to_block_size_is_fine(tmp_path):
    assert load_plan(_manifest(tmp_path, BASE), ["train.seq_len=64"]).runs[0].train.seq_len == 64


def test_plan_dict_is_unchanged_by_checks(tmp_path):
    tree = yaml.safe_load(BASE)
    before = copy.deepcopy(tree)
    load_plan_from_dict(tree, tmp_path)
    assert tree == before


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_3000_deep_tree_from_python_is_one_line(tmp_path, kind):
    deep: object = 1
    for _ in range(3000):
        deep = [deep] if kind == "list" else {"k": deep}
    tree = {**yaml.safe_load(BASE), "model": deep}
    assert "nested deeper than" in _fails(load_plan_from_dict, tree, tmp_path)


def test_diamond_of_extends_reads_each_file_once(tmp_path):
    # f0 extends [f1, f1], f1 extends [f2, f2], ...: 2^40 loads without memoization
    for i in range(40):
        (tmp_path / f"f{i}.yml").write_text(f"extends: [f{i + 1}.yml, f{i + 1}.yml]\nvars: {{v{i}: {i}}}\n")
    (tmp_path / "f40.yml").write_text(BASE)
    start = time.perf_counter()
    plan = load_plan(tmp_path / "f0.yml")
    assert time.perf_counter() - start < 2.0
    assert plan.vars["v0"] == 0 and plan.vars["v39"] == 39 and len(plan.runs) == 2


def test_too_many_extended_files(tmp_path):
    for i in range(300):
        (tmp_path / f"f{i}.yml").write_text(f"extends: f{i + 1}.yml\n")
    (tmp_path / "f300.yml").write_text(BASE)
    assert "more than 256 files extended" in _fails(load_plan, tmp_path / "f0.yml")
