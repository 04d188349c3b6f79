"""The `fxprefetch plan` command line, end to end through subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from fxprefetch.cli import main
from fxprefetch.plan.schema import schema_errors
from fxprefetch.presets import PRESETS

pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = json.loads(resources.files("fxprefetch.plan").joinpath("plan_schema.json").read_text())
# the CLI's main in a child process, reporting its peak resident memory on stderr. VmHWM is
# the peak of the child's own address space; getrusage's ru_maxrss would also carry the
# peak of the pytest process it was spawned from (Linux keeps it across exec).
_WITH_RSS = (
    "import re, sys\nfrom fxprefetch.cli import main\nrc = main(sys.argv[1:])\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
    "print('MAXRSS_KB', hwm, file=sys.stderr)\nsys.exit(rc)"
)


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITH_RSS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def preset_runs() -> dict[str, subprocess.CompletedProcess]:
    """`fxprefetch plan --format json` for every preset, in concurrent child processes."""
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str) -> subprocess.CompletedProcess:
        layers = [] if PRESETS[name].tiny else ["--layers", "2"]
        return _cli("plan", "--model", name, *layers, "--format", "json", "--quiet")

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(PRESETS, pool.map(run, PRESETS), strict=True))


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    jsonschema.validate(data, SCHEMA)
    assert schema_errors(data, SCHEMA) == []  # the validator fxprefetch ships agrees
    return data


@pytest.mark.parametrize("preset", [n for n, p in PRESETS.items() if p.tiny])
def test_tiny_presets(preset, preset_runs):
    data = _json(preset_runs[preset])
    (plan,) = data["plans"]
    roles = plan["summary"]["by_role"]
    assert roles["attn.qkv"] == 6
    assert roles.get("mlp.gate_up", 0) + roles.get("moe.gate_up", 0) in (2, 4)
    for linear in plan["linears"]:
        assert (linear["prefetch_node"] is None) == (linear["skip_reason"] is not None)


@pytest.mark.parametrize("preset", [n for n, p in PRESETS.items() if not p.tiny])
def test_real_size_presets_use_little_memory(preset, preset_runs):
    proc = preset_runs[preset]
    data = _json(proc)
    assert data["layers_built"] == 2 and data["layers_total"] > 2
    linears = [r for p in data["plans"] for r in p["linears"]]
    weight_bytes = sum(r["weight_bytes"] for r in linears)
    rss = int(proc.stderr.split("MAXRSS_KB")[1].split()[0]) * 1024
    assert rss < weight_bytes / 2, (rss, weight_bytes)  # the weights were never allocated
    capped = [r for r in linears if r["capped"]]
    assert capped and all(r["prefetch_bytes"] == 18 * 1024 * 1024 for r in capped)


def test_config_json_file_and_table(tmp_path):
    config = {
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "dtype": "float32",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [
            "fxprefetch",
            "plan",
            "--model",
            str(path),
            "--config",
            '{"prefetch_ratio": {"mlp": {"gate_up": 0.5}}}',
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "layer" in out and "role" in out and "window / skip reason" in out
    assert "0-2 (x3)" in out  # identical layers folded
    assert "totals: 28 linears seen, 15 prefetched" in out
    assert "6 not a weight" in out  # the attention score and value matmuls
    assert "[2/3] tracing and planning" in proc.stderr  # progress
    assert f"{96 * 48 * 4 // 2 / 1024:.1f} KiB" in out  # gate_up at ratio 0.5


def test_python_dash_m_additional_config_and_output_file(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fxprefetch",
            "plan",
            "--model",
            "llama-tiny",
            "--additional-config",
            '{"weight_prefetch_config": {"enabled": true, "prefetch_ratio": '
            '{"attn": {"qkv": 0}}}, "other": 1}',
            "--format",
            "json",
            "--output",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    jsonschema.validate(data, SCHEMA)
    assert "attn.qkv" not in data["plans"][0]["summary"]["by_role"]


def test_pictures_are_valid_svg_and_png(tmp_path):
    svg, png = tmp_path / "t.svg", tmp_path / "t.png"
    assert (
        main(
            [
                "plan",
                "--model",
                "qwen3-moe-tiny",
                "--svg",
                str(svg),
                "--png",
                str(png),
                "--quiet",
                "--output",
                str(tmp_path / "t.txt"),
            ]
        )
        == 0
    )
    import xml.etree.ElementTree as ET

    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    assert "prefetch" in text and "compute" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["plan", "--config", '{"enable": true}'], "weight_prefetch_config.enable: unknown key"),
        (["plan", "--config", '{"enabled": tru}'], "line 1, column 13"),
        (["plan", "--config", "missing.json"], "neither JSON nor a readable file"),
        (["plan", "--layers", "0"], "expected a positive integer"),
        (
            ["plan", "--model", "llama-3-8b", "--layers", "100000"],
            "--layers: llama-3-8b has 32 decoder layers, got 100000 (expected 1 to 32)",
        ),
        (["plan", "--format", "yaml"], "invalid choice: 'yaml'"),
        (["plan", "--config", "{}", "--additional-config", "{}"], "not allowed with"),
        (["plann"], "invalid choice: 'plann'"),
        ([], "required"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxprefetch: error:")
    assert message in err


def test_bad_arguments_in_a_subprocess_have_no_traceback(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    proc = subprocess.run(
        ["fxprefetch", "plan", "--model", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert str(bad) in proc.stderr


def test_demo_command_runs():
    proc = subprocess.run(
        ["fxprefetch", "demo", "--target", "eager"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "outputs match eager: yes" in proc.stdout
    assert "prefetches planned per forward: 10" in proc.stdout
    assert "reached the prefetch kernel: 10" in proc.stdout  # the eager target runs the op
    assert "planned hints" not in proc.stdout


@pytest.mark.parametrize(("passed", "code"), [(True, 0), (False, 1)])
def test_demo_prints_the_demo_and_exits_1_where_it_did_not_hold_up(
    passed, code, monkeypatch, capsys
):
    import fxprefetch.demo
    from fxprefetch.demo import DemoResult

    seen = []

    def fake(model_name, options):
        seen.append((model_name, options))
        return DemoResult("the demo's text", passed)

    monkeypatch.setattr(fxprefetch.demo, "run_demo", fake)
    assert main(["demo", "--model", "mixtral-tiny", "--config", '{"enabled": true}']) == code
    assert capsys.readouterr().out == "the demo's text\n"
    assert seen == [
        ("mixtral-tiny", {"target": "auto", "weight_prefetch_config": '{"enabled": true}'})
    ]


def test_schema_file_is_shipped():
    assert Path(str(resources.files("fxprefetch.plan").joinpath("plan_schema.json"))).is_file()


# -- every user error exits 2 with one line ------------------------------------------------------


def _config_json(tmp_path, **fields):
    data = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        **fields,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def _deep_json(path, depth=100_000):
    path.write_text("[" * depth + "]" * depth)
    return str(path)


def _latin1(tmp_path, name="config.bin"):
    path = tmp_path / name
    path.write_bytes('{"note": "caf\u00e9"}'.encode("latin-1"))
    return str(path)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t: ["plan", "--svg", str(t)], "is a directory"),
        (
            lambda t: ["plan", "--svg", str(t / "x.svg") if (t / "x.svg").mkdir() is None else ""],
            "is a directory",
        ),
        (lambda t: ["plan", "--svg", str(t / "missing" / "t.svg")], "does not exist"),
        (lambda t: ["plan", "--svg", "/proc/t.svg"], "--svg: cannot write"),
        (lambda t: ["plan", "--png", str(t / "x.txt")], "--png: expected a file name ending"),
        (
            lambda t: ["plan", "--model", _config_json(t, model_type="vit")],
            "is not a causal language model",
        ),
        (
            lambda t: ["plan", "--model", _config_json(t, torch_dtype="float33")],
            "torch_dtype must name a torch dtype",
        ),
        (
            lambda t: ["plan", "--model", _config_json(t, hidden_size="64")],
            "hidden_size must be an integer",
        ),
        (
            lambda t: ["plan", "--model", _config_json(t, num_hidden_layers=0)],
            "num_hidden_layers must be at least 1, got 0",
        ),
        (lambda t: ["plan", "--model", "llama-3-8b", "--tokens", "2000000000"], "at most 131072"),
        # a config.json whose sizes make no model
        (
            lambda t: ["plan", "--model", _config_json(t, hidden_size=0)],
            "hidden_size must be at least 1, got 0",
        ),
        (
            lambda t: ["plan", "--model", _config_json(t, num_attention_heads=5)],
            "num_attention_heads (5) must be a multiple of num_key_value_heads (2)",
        ),
        (
            lambda t: [
                "plan",
                "--model",
                _config_json(t, num_attention_heads=5, num_key_value_heads=5),
            ],
            "hidden size (64) is not a multiple of the number of attention heads (5)",
        ),
        (lambda t: ["plan", "--config", _latin1(t)], "is not UTF-8 text"),
        (lambda t: ["plan", "--model", _latin1(t, "config.json")], "cannot read"),
        # adversarial review: D2, D3, D5
        (
            lambda t: ["plan", "--model", _deep_json(t / "config.json")],
            "config.json: JSON nested too deeply",
        ),
        (
            lambda t: ["plan", "--model", _config_json(t, hidden_act="bogus"), "--quiet"],
            "config.json: hidden_act 'bogus' is not an activation transformers knows",
        ),
        (lambda t: ["plan", "--config", "null"], "expected a JSON object, got null"),
        (lambda t: ["plan", "--additional-config", "null"], "expected a JSON object, got null"),
        (lambda t: ["plan", "--config", " 3 "], "expected a JSON object, got number 3"),
    ],
)
def test_user_errors_exit_2_with_one_line(make_args, message, tmp_path, capsys):
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxprefetch: error:"), err
    assert message in err
    assert "--layers" not in err


# -- --from-dir validates plan files and takes only the options it uses --------------------------


def _plan_data() -> dict:
    from fxprefetch.plan import LinearRecord, PrefetchPlan, SkipReason

    qkv = LinearRecord(
        node="mm",
        op="aten::mm",
        module="layers.0.self_attn.qkv_proj",
        weight="layers.0.self_attn.qkv_proj.weight",
        layer=0,
        role="attn.qkv",
        weight_shape=(96, 32),
        dtype="torch.float32",
        weight_bytes=12288,
        ratio=1.0,
        prefetch_bytes=12288,
        window=("aten::rsqrt", "aten::mul"),
        window_kind="vector",
        dependency="embedding",
        dependency_op="aten::embedding",
        prefetch_node="prefetch_default",
    )
    head = LinearRecord(
        node="mm_1",
        op="aten::mm",
        module="lm_head",
        weight="lm_head.weight",
        layer=None,
        role=None,
        weight_shape=(64, 32),
        dtype="torch.float32",
        weight_bytes=8192,
        skip_reason=SkipReason.NO_ROLE,
    )
    return PrefetchPlan([qkv, head], graph="graph0 (inference)").to_dict()


def _set(path: tuple, value):
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return data

    return mutate


BAD_PLANS = {
    "a list": (lambda d: [], "the top level: expected object, got []"),
    "null": (lambda d: None, "the top level: expected object, got null"),
    "string bytes": (
        _set(("linears", 0, "weight_bytes"), "12288"),
        'linears[0].weight_bytes: expected integer, got "12288"',
    ),
    "negative bytes": (
        _set(("linears", 0, "weight_bytes"), -4),
        "linears[0].weight_bytes: expected at least -1, got -4",
    ),
    "capped yes": (
        _set(("linears", 0, "capped"), "yes"),
        'linears[0].capped: expected boolean, got "yes"',
    ),
    "unknown field": (_set(("linears", 1, "speed"), 3), "linears[1]: unknown field 'speed'"),
    "role not a role": (
        _set(("linears", 0, "role"), "attn"),
        "linears[0].role: expected a string matching",
    ),
    "unknown role": (
        _set(("linears", 0, "role"), "attn.gate"),
        "linears[0].role: expected one of ['attn.qkv', 'attn.o', 'moe.gate_up', ",
    ),
    "bogus skip reason": (
        _set(("linears", 1, "skip_reason"), "felt like it"),
        "linears[1].skip_reason: expected a reason fxprefetch gives",
    ),
    "NaN ratio": (
        _set(("linears", 0, "ratio"), float("nan")),
        "linears[0].ratio: expected number or null, got NaN",
    ),
    "prefetch past the weight": (
        _set(("linears", 0, "prefetch_bytes"), 12289),
        "linears[0].prefetch_bytes: expected at most span_bytes (12288, ",
    ),
    "prefetch past int64": (
        _set(("linears", 0, "prefetch_bytes"), 2**63),
        "linears[0].prefetch_bytes: expected at most 9223372036854775807, got 9223372036854775808",
    ),
}
# what fxprefetch refuses beyond the schema: names it checks against its tables, a size past
# the bytes the weight covers, and NaN (no JSON number: jsonschema takes Python's NaN)
NOT_SCHEMA_CASES = ("bogus skip reason", "unknown role", "prefetch past the weight", "NaN ratio")


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_from_dir_rejects_what_is_not_a_plan(case, tmp_path, capsys):
    mutate, message = BAD_PLANS[case]
    (tmp_path / "plan-1-graph0.json").write_text(json.dumps(mutate(_plan_data())))
    assert main(["plan", "--from-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fxprefetch: error: --from-dir: "), err
    assert "plan-1-graph0.json: not a plan file: " + message in err


def test_from_dir_rejects_json_nested_too_deeply(tmp_path, capsys):
    _deep_json(tmp_path / "plan-1-graph0.json")
    assert main(["plan", "--from-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "plan-1-graph0.json: not a plan file: JSON nested too deeply" in err


def test_transformers_failing_on_a_config_json_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """Any error transformers raises building a user's config.json: exit 2, one line."""
    import transformers

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot\nbuild this")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    assert main(["plan", "--model", _config_json(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "config.json: transformers cannot build a model from it: RuntimeError: cannot" in err


def test_from_dir_renders_a_valid_plan(tmp_path, capsys):
    (tmp_path / "plan-1-graph0.json").write_text(json.dumps(_plan_data()))
    assert main(["plan", "--from-dir", str(tmp_path), "--no-fold", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "self_attn.qkv_proj" in out and "totals: 2 linears seen, 1 prefetched" in out


@pytest.mark.parametrize(
    "extra",
    [
        ["--svg", "t.svg"],
        ["--png", "t.png"],
        ["--config", "{}"],
        ["--model", "llama-tiny"],
        ["--layers", "2"],
        ["--tokens", "8"],
        ["--additional-config", "{}"],
    ],
)
def test_from_dir_refuses_options_it_cannot_use(extra, tmp_path, capsys):
    (tmp_path / "plan-1-graph0.json").write_text(json.dumps(_plan_data()))
    assert main(["plan", "--from-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot use {extra[0]} " in err, err
    assert "(with --from-dir: --format, --output, --no-fold, --quiet)" in err


def test_schema_check_agrees_with_jsonschema():
    """fxprefetch validates plan files without jsonschema (a test dependency only)."""
    from fxprefetch.plan.schema import SchemaError, schema_errors

    plan_schema = {"$ref": "#/$defs/plan"}
    validator = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], **plan_schema})
    assert schema_errors(_plan_data(), plan_schema, SCHEMA) == []
    assert validator.is_valid(_plan_data())
    for case, (mutate, _) in BAD_PLANS.items():
        data = mutate(_plan_data())
        ours = schema_errors(data, plan_schema, SCHEMA)
        # a skip reason or a role-shaped name is any string to the schema; fxprefetch checks
        # them against SkipReason and the role table
        schema_only = case not in NOT_SCHEMA_CASES
        assert (not validator.is_valid(data)) == schema_only, case
        assert bool(ours) == schema_only or case == "NaN ratio", case
    with pytest.raises(SchemaError, match="'minLength' is not supported"):
        schema_errors("x", {"minLength": 2})


def test_plan_on_a_device_prints_the_predicted_saving(capsys, tmp_path):
    """`fxprefetch plan --device h200 --tokens 1`: the GPU's windows (o behind
    attention, down behind SiLU-and-mul), the model's saving per layer and per step, and
    every constant of the profile with its provenance."""
    forced = ["--config", '{"force_prefetch": true}']
    argv = ["plan", "--model", "llama-tiny", "--device", "h200", "--tokens", "1", "--quiet"]
    assert main([*argv, *forced]) == 0
    out = capsys.readouterr().out
    assert "hides µs (model)" in out and "attention:" in out
    assert "prediction on h200" in out and "not a measurement" in out
    assert "per layer:" in out and "per step:" in out
    assert "delta_us_per_mb_1_token = 0.0553  [measured:" in out
    assert main(argv) == 0  # the default: nothing emitted on an H200, each one said
    out = capsys.readouterr().out
    assert "not emitted:" in out and "predicted loss on NVIDIA H200" in out
    path = tmp_path / "plan.json"
    # names of choices and presets are case-insensitive
    argv = [
        "plan",
        "--model",
        "Llama-Tiny",
        "--device",
        "H200",
        "--tokens",
        "1",
        "--quiet",
        *forced,
    ]
    assert main([*argv, "--format", "JSON", "--output", str(path)]) == 0
    data = json.loads(path.read_text())
    jsonschema.validate(data, SCHEMA)
    (plan,) = data["plans"]
    assert data["model"] == "llama-tiny"
    assert plan["schema_version"] == 3 and plan["prediction"]["device"] == "h200"
    assert all(r["prediction"] is not None for r in plan["linears"] if r["prefetch_node"])
    assert main([*argv[:-5], "--device", "h300"]) == 2  # not a profile: a usage error
