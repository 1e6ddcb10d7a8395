"""Hostile settings (command-line values, YAML recipes, mergekit configs): each is one line
`gpumerge: error: ...` with exit code 2 (no traceback, no internal error, no hang, bounded memory), and
`gpumerge plan` refuses them exactly as the merge does, before its first byte."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import yaml
from conftest import run_cli, source_env
from test_cli_errors import assert_one_line_error, merge_args

from gpumerge import devices
from gpumerge.errors import SpecError
from gpumerge.recipes import load_yaml, recipe_loader
from gpumerge.spec import (MAX_LAYER_NUMBER, MAX_SIZE_BYTES, MIN_DEVICE_BUDGET_BYTES, MergeSpec, parse_max_memory,
                           parse_size)

BIG = "1" + "0" * 400  # a 401-digit integer


def both_refuse(models, tmp_path, capsys, *flags, needles=()) -> str:
    """The merge and `gpumerge plan` give the same one-line error, and nothing appears at OUT."""
    out = tmp_path / "out"
    errors = []
    for command in ((), ("plan",)):
        code, _, err = run_cli(*command, *merge_args(models["fp16_a"], models["fp16_b"], out, *flags),
                               capsys=capsys)
        assert_one_line_error(code, err, *needles)
        errors.append(err)
    assert errors[0] == errors[1]
    assert not out.exists()
    return errors[0]


def run_guarded(*argv, timeout_s: float = 60) -> tuple[int, str]:
    """`python -m gpumerge ...` with 2 GiB of address space and a timeout: a regression fails the test (MemoryError
    is an internal error, a hang a TimeoutExpired) instead of hanging the suite or exhausting the machine."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31))

    proc = subprocess.run([sys.executable, "-m", "gpumerge", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout_s, preexec_fn=limit, env=source_env())
    return proc.returncode, proc.stderr


def t_column(plan_table: str) -> list[str]:
    """The `model 2 (t)` column of `gpumerge plan`'s table, row by row."""
    rows = [line.split() for line in plan_table.splitlines()]
    return [r[3] for r in rows if len(r) >= 6 and (r[0].isdigit() or r[0] == "-")]


def write(path, text: str):
    path.write_text(text)
    return path


# ---- 1. the recipe file: regular, bounded, UTF-8 ------------------------------------------------------------------

@pytest.mark.parametrize("command", [(), ("plan",)])
def test_config_dev_zero_is_refused_without_reading_it(tmp_path, command):
    code, err = run_guarded(*command, "--config", "/dev/zero", "--output_model_path", tmp_path / "out")
    assert_one_line_error(code, err, "--config /dev/zero", "is a device", "regular file")


@pytest.mark.parametrize("command", [(), ("plan",)])
def test_config_fifo_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    code, err = run_guarded(*command, "--config", fifo, "--output_model_path", tmp_path / "out", timeout_s=30)
    assert_one_line_error(code, err, "is a FIFO", "regular file")


def test_config_too_large_is_refused(tmp_path, capsys):
    from gpumerge.spec import MAX_RECIPE_BYTES

    path = write(tmp_path / "big.yaml", "gradient_values: [" + "0," * (MAX_RECIPE_BYTES // 2) + "0]\n")
    code, _, err = run_cli("--config", path, capsys=capsys)
    assert_one_line_error(code, err, str(path), f"more than the {MAX_RECIPE_BYTES} bytes")


@pytest.mark.parametrize("raw, needle", [
    ("model_path1: x\n".encode("utf-16"), "UTF-16"),
    ("model_path1: café\n".encode("latin-1"), "is not UTF-8"),
])
def test_config_not_utf8_is_refused(models, tmp_path, capsys, raw, needle):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(str(path), needle, "save it as UTF-8"))


def test_config_of_an_unknown_user(models, tmp_path, capsys):
    both_refuse(models, tmp_path, capsys, "--config", "~gpumerge_no_such_user/r.yaml",
                needles=("--config ~gpumerge_no_such_user/r.yaml", "no user named gpumerge_no_such_user"))


@pytest.mark.parametrize("flag", ["--model_path1", "--model_path2", "--output_model_path"])
def test_path_of_an_unknown_user(models, tmp_path, capsys, flag):
    flags = dict(zip(("--model_path1", "--model_path2", "--output_model_path"),
                     (models["fp16_a"], models["fp16_b"], tmp_path / "out")))
    flags[flag] = "~gpumerge_no_such_user/m"
    code, _, err = run_cli(*[x for pair in flags.items() for x in pair], "--quiet", capsys=capsys)
    assert_one_line_error(code, err, f"{flag} ~gpumerge_no_such_user/m", "no user named gpumerge_no_such_user")
    path = write(tmp_path / "r.yaml", f"{flag[2:]}: ~gpumerge_no_such_user/m\n")
    code, _, err = run_cli("plan", "--config", path, *[x for pair in flags.items() if pair[0] != flag for x in pair],
                           capsys=capsys)
    assert_one_line_error(code, err, f"{path}: {flag[2:]} ~gpumerge_no_such_user/m", "no user named")


# ---- 2. YAML aliases: cycles, expansion, depth --------------------------------------------------------------------

def mergekit_slerp(models, t: str) -> str:
    return (f"merge_method: slerp\nbase_model: {models['fp16_a']}\nmodels:\n  - {models['fp16_a']}\n"
            f"  - {models['fp16_b']}\nparameters:\n  t: {t}\n")


@pytest.mark.parametrize("recipe", [
    "gradient_values: &a [*a]\n",
    "operations: &a [{gradient_values: [1], operation: *a}]\n",
    "layer_gradients: &a {default: [1], mlp: *a}\n",
    "gradient_values: [1]\nfilter: &a [*a]\n",
    "MERGEKIT &a [*a]",
    "MERGEKIT &a [{filter: mlp, value: *a}]",
    "MERGEKIT &a {value: *a}",
])
def test_recursive_alias_is_refused(models, tmp_path, capsys, recipe):
    text = mergekit_slerp(models, recipe.removeprefix("MERGEKIT ")) if recipe.startswith("MERGEKIT") else recipe
    path = write(tmp_path / "r.yaml", text)
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(str(path), "recursive alias"))


def laughs(levels: int = 9) -> str:
    """The billion laughs as one flow list: level i holds 9 aliases of level i - 1, so the last of 9 levels expands
    to 9**9 = 387 million strings."""
    items = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("recipe", ["gradient_values: LAUGHS\n", "model_path1: LAUGHS\n",
                                    "gradient_values: [1]\nlayer_only: LAUGHS\n", "MERGEKIT"])
def test_alias_expansion_is_bounded(models, tmp_path, recipe):
    if recipe == "MERGEKIT":
        text = mergekit_slerp(models, "0.5") + "tokenizer_source: LAUGHS\n"
    else:
        text = recipe
    path = write(tmp_path / "r.yaml", text.replace("LAUGHS", laughs()))
    code, err = run_guarded("--config", path, *merge_args(models["fp16_a"], models["fp16_b"], tmp_path / "out"),
                            timeout_s=30)
    assert_one_line_error(code, err, str(path), "aliases")


def test_deep_nesting_is_refused(models, tmp_path, capsys):
    nested = "{value: " * 200 + "0.5" + "}" * 200
    path = write(tmp_path / "r.yaml", mergekit_slerp(models, nested))
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(str(path), "nested", "levels deep"))


def test_yaml_size_bound_counts_expanded_values():
    with pytest.raises(SpecError, match="aliases"):
        load_yaml("x: " + laughs(7), source="r.yaml")
    assert load_yaml("a: &a [1, 2]\nb: [*a, *a]\n", source="r.yaml") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


def test_duplicate_yaml_keys_are_refused(models, tmp_path, capsys):
    path = write(tmp_path / "r.yaml", "gradient_start: 0.1\ngradient_start: 0.9\n")
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(str(path), "'gradient_start' appears twice"))
    # merge keys (<<) are not duplicates: that is what they are for
    data = load_yaml("base: &b {t: 1, u: 2}\nover: {<<: *b, t: 3}\n", source="r.yaml")
    assert data["over"] == {"t": 3, "u": 2}


# ---- 3. numbers and sizes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["layer_start", "layer_end"])
def test_huge_layer_number_in_yaml(models, tmp_path, capsys, key):
    path = write(tmp_path / "r.yaml", f"{key}: {BIG}\n")
    both_refuse(models, tmp_path, capsys, "--config", path,
                needles=(f"{path}: {key}", "a 401-digit integer", f"at most {MAX_LAYER_NUMBER}"))


def test_huge_layer_number_on_the_command_line(models, tmp_path, capsys):
    both_refuse(models, tmp_path, capsys, "--layer_end", BIG, needles=("--layer_end", "a 401-digit integer"))


@pytest.mark.parametrize("key", ["gradient_start", "gradient_end"])
def test_huge_gradient_in_yaml(models, tmp_path, capsys, key):
    path = write(tmp_path / "r.yaml", f"{key}: {BIG}\n")
    both_refuse(models, tmp_path, capsys, "--config", path,
                needles=(f"{path}: {key}", "finite number", "a 401-digit integer"))


@pytest.mark.parametrize("flags", [("--max_shard_size", BIG), ("--max_shard_size", BIG + "GiB"),
                                   ("--max_shard_size", "1" + "0" * 19)])
def test_absurd_shard_size(models, tmp_path, capsys, flags):
    both_refuse(models, tmp_path, capsys, *flags, needles=("--max_shard_size", f"more than {MAX_SIZE_BYTES}"))


def test_absurd_shard_size_in_yaml(models, tmp_path, capsys):
    path = write(tmp_path / "r.yaml", f"max_shard_size: {BIG}\n")
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(f"{path}: max_shard_size", "more than"))


@pytest.mark.parametrize("text, expected", [("2.01GB", 2_010_000_000), ("2.01KB", 2010), ("0.5KiB", 512),
                                            (f"{MAX_SIZE_BYTES}", MAX_SIZE_BYTES), ("1TiB", 2**40)])
def test_parse_size_is_exact(text, expected):
    assert parse_size(text) == expected


# ---- 4. t must be a finite float32 --------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (("--gradient_start", "1e308"), "t=1e+308"),
    (("--gradient_start", "1e39", "--dtype", "float32"), "t=1e+39"),
    (("--gradient_end=-3.5e38",), "t=-3.5e+38"),
    (("--gradient_values", "[1e308,-1e308]"), "model.embed_tokens.weight t=nan"),
])
def test_t_beyond_float32_is_refused_before_the_merge(models, tmp_path, capsys, flags, needle):
    both_refuse(models, tmp_path, capsys, *flags, needles=(needle, "3.4028234663852886e+38"))


def test_mergekit_coefficients_beyond_float32(models, tmp_path, capsys):
    a, b = models["fp16_a"], models["fp16_b"]
    text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1e39}}\n"
            f"  - model: {b}\n    parameters: {{weight: 1}}\nparameters: {{normalize: false}}\n")
    path = write(tmp_path / "r.yaml", text)
    both_refuse(models, tmp_path, capsys, "--config", path, needles=("coefficient", "1e+39"))


@pytest.mark.parametrize("start, end", [("-2", "3"), ("3.4028234663852886e38", "-3.4028234663852886e38")])
def test_extrapolating_t_within_float32_is_planned(models, tmp_path, capsys, start, end):
    code, stdout, err = run_cli("plan", *merge_args(models["fp16_a"], models["fp16_b"], tmp_path / "out",
                                                    f"--gradient_start={start}", f"--gradient_end={end}"),
                                capsys=capsys)
    assert code == 0, err
    assert t_column(stdout)[0] == f"{float(start):.6g}" and t_column(stdout)[-1] == f"{float(end):.6g}"


# ---- 5 and 6. --max_memory ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["cpu=1KB", "cpu=64KB", "cpu=1000", "cpu=0", "cpu=0.5MiB"])
def test_max_memory_below_the_minimum(models, tmp_path, capsys, value):
    err = both_refuse(models, tmp_path, capsys, "--device", "cpu", "--max_memory", value,
                      needles=(f"--max_memory {value!r}: cpu gets", "less than the minimum",
                               f"{MIN_DEVICE_BUDGET_BYTES} bytes"))
    assert "is not a size" not in err


def test_max_memory_minimum_names_the_device():
    with pytest.raises(SpecError, match="cuda:1 gets 1000000 bytes, less than the minimum"):
        parse_max_memory("0=20GiB,1=1MB")


@pytest.mark.parametrize("text, expected", [
    ("cpu=1000TB", {"cpu": 10**15}),
    ("cpu=16777216", {"cpu": 2**24}),
    ("0=2.01GB,cpu=16MiB", {0: 2_010_000_000, "cpu": 2**24}),
])
def test_max_memory_sizes_are_gpumerges(text, expected):
    assert parse_max_memory(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("cpu=1GB,cpu=2GB", "names cpu twice"),
    ("0=1GB,cuda:0=2GB", "names cuda:0 twice"),
    ("²=1GB", "each entry is DEVICE=SIZE"),
    (f"cpu={BIG}", "more than"),
    ("cpu=lots", "is not a size"),
    ("9" * 5000 + "=1GB", "each entry is DEVICE=SIZE"),
])
def test_max_memory_rejects(text, needle):
    with pytest.raises(SpecError, match=needle):
        parse_max_memory(text)


def test_device_with_a_huge_index(models, tmp_path, capsys):
    both_refuse(models, tmp_path, capsys, "--device", "cuda:" + "9" * 5000, needles=("--device", "is not one of"))


def test_max_memory_for_a_gpu_the_merge_does_not_use(models, tmp_path, capsys):
    both_refuse(models, tmp_path, capsys, "--device", "cpu", "--max_memory", "0=1GiB",
                needles=("--max_memory", "does not use"))


@pytest.mark.skipif(devices.cuda_possible(), reason="an NVIDIA driver is loaded here")
@pytest.mark.parametrize("flags", [("--device", "cuda"), ("--device", "cuda:1"), ("--max_memory", "0=1GiB")])
def test_cuda_settings_without_a_driver(models, tmp_path, capsys, flags):
    both_refuse(models, tmp_path, capsys, *flags, needles=("CUDA" if flags[0] == "--device" else "does not use",))


def test_spec_checks_its_budget():
    with pytest.raises(SpecError, match="minimum"):
        MergeSpec(model_path1="a", model_path2="b", output_model_path=None, max_memory=(("cpu", 1024),))


def test_probed_budget_never_falls_below_the_minimum(monkeypatch):
    monkeypatch.setattr(devices, "available_ram", lambda: 2**20)
    assert devices.probe_budget(["cpu"]) == {"cpu": MIN_DEVICE_BUDGET_BYTES}


# ---- 6. YAML 1.2 floats -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["CSafeLoader", "SafeLoader"])
def test_yaml_reads_exponent_floats(base):
    if not hasattr(yaml, base):
        pytest.skip(f"PyYAML without {base}")
    loader = recipe_loader(getattr(yaml, base))
    data = yaml.load("a: 1e-3\nb: 1E5\nc: -2.5e+3\nd: 12\ne: '1e3'\nf: 1.5\ng: 1_000\nh: 2.5e3\ni: .5E-1\n",
                     Loader=loader)  # noqa: S506
    assert data == {"a": 0.001, "b": 1e5, "c": -2500.0, "d": 12, "e": "1e3", "f": 1.5, "g": 1000, "h": 2500.0,
                    "i": 0.05}
    assert type(data["d"]) is int


def test_recipe_dumper_quotes_strings_the_loader_would_read_as_floats():
    from gpumerge.recipes import recipe_dumper

    data = {"model_path1": "1e10", "filter": "2E5", "t": 1e-5, "n": 3, "s": "mlp"}
    text = yaml.dump(data, Dumper=recipe_dumper(), sort_keys=False)
    assert "'1e10'" in text and "'2E5'" in text
    assert load_yaml(text, source="r.yaml") == data


def test_recipes_use_libyaml_when_present():
    if not hasattr(yaml, "CSafeLoader"):
        pytest.skip("PyYAML without libyaml")
    assert issubclass(recipe_loader(), yaml.CSafeLoader)


def test_mergekit_weight_in_exponent_notation(models, tmp_path, capsys):
    a, b = models["fp16_a"], models["fp16_b"]
    text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1e-3}}\n"
            f"  - model: {b}\n    parameters: {{weight: 3E-3}}\n")
    path = write(tmp_path / "r.yaml", text)
    code, stdout, err = run_cli("plan", "--config", path, capsys=capsys)
    assert code == 0, err
    assert set(t_column(stdout)) == {"0.75"}  # t = 3e-3 / (1e-3 + 3e-3), for every tensor


def test_recipe_gradient_in_exponent_notation(models, tmp_path, capsys):
    path = write(tmp_path / "r.yaml", "gradient_start: 1e-1\ngradient_end: 9E-1\n")
    code, stdout, err = run_cli("plan", "--config", path, "--model_path1", models["fp16_a"], "--model_path2",
                                models["fp16_b"], capsys=capsys)
    assert code == 0, err
    assert t_column(stdout) == ["0.1", "0.3", "0.5", "0.7", "0.9"]


# ---- the same classes of problem elsewhere ------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, needle", [
    ('model_path1: "a\\0b"\n', "NUL"),
    ('output_model_path: "o\\0"\n', "NUL"),
    ("gradient_values: [1]\nlayer_only: 2001-01-01\n", "layer_only must be true or false"),
    ("layer_gradients: {default: [1], mlp: {a: 1}}\n", "layer_gradients.mlp"),
    ("operations: [{gradient_values: [1], filter: !!binary aGk=}]\n", "filter must be a string"),
    ("dtype: 2001-13-45\n", "not valid YAML"),
    (f"gradient_values: [{BIG}]\n", "a 401-digit integer"),
    ("layer_start: !!float .nan\n", "layer_start must be an integer"),
    ("layer_start: 1e300\n", f"at most {MAX_LAYER_NUMBER}"),
    ("method: [lerp]\n", "method must be a string"),
])
def test_recipe_values_of_the_wrong_kind(models, tmp_path, capsys, recipe, needle):
    path = write(tmp_path / "r.yaml", recipe)
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(needle,))


@pytest.mark.parametrize("parameters, needle", [
    ("{t: .nan}", "finite"),
    ("{t: [0, .inf]}", "finite"),
    (f"{{t: {BIG}}}", "a 401-digit integer"),
    ("{t: [{filter: mlp, value: 0.5}, {filter: 7, value: 1}]}", "filter: SUBSTRING"),
    ("{t: {value: 0.5, other: 1}}", "other"),
])
def test_mergekit_parameters_of_the_wrong_kind(models, tmp_path, capsys, parameters, needle):
    text = mergekit_slerp(models, "0.5").replace("parameters:\n  t: 0.5\n", f"parameters: {parameters}\n")
    path = write(tmp_path / "r.yaml", text)
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(needle,))


def test_mergekit_empty_base_model_is_refused(models, tmp_path, capsys):
    text = mergekit_slerp(models, "0.5").replace(f"base_model: {models['fp16_a']}", 'base_model: ""')
    path = write(tmp_path / "r.yaml", text.replace("merge_method: slerp", "merge_method: linear")
                 .replace("parameters:\n  t: 0.5\n", "parameters: {weight: 0.5}\n"))
    both_refuse(models, tmp_path, capsys, "--config", path, needles=("base_model", "a model is a path or hub id"))


@pytest.mark.parametrize("layer_range, needle", [(f"[0, {BIG}]", "a 401-digit integer"),
                                                 ("[0, 5.0]", "layer_range must be"), ("[0, true]", "layer_range")])
def test_mergekit_layer_range_of_the_wrong_kind(models, tmp_path, capsys, layer_range, needle):
    a, b = models["fp16_a"], models["fp16_b"]
    text = (f"merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
            f"      - {{model: {a}, layer_range: {layer_range}}}\n      - {{model: {b}, layer_range: {layer_range}}}\n")
    path = write(tmp_path / "r.yaml", text)
    both_refuse(models, tmp_path, capsys, "--config", path, needles=(needle,))


def test_long_values_are_shortened_in_messages(models, tmp_path, capsys):
    path = write(tmp_path / "r.yaml", "layer_only: '" + "x" * 100_000 + "'\ngradient_values: [1]\n")
    err = both_refuse(models, tmp_path, capsys, "--config", path, needles=("layer_only must be true or false",))
    assert len(err) < 1000
