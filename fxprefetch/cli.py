"""Command line: ``fxprefetch demo``, ``fxprefetch plan`` and ``fxprefetch calibrate`` (also
``python -m fxprefetch``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from fxprefetch.errors import CliError
from fxprefetch.validation import ConfigError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(message)


class Progress:
    """A stage counter on stderr: ``[2/3] tracing and planning ... 3.1s``."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    @contextmanager
    def stage(self, text: str) -> Iterator[None]:
        self.done += 1
        start = time.perf_counter()
        if self.enabled:
            sys.stderr.write(f"[{self.done}/{self.total}] {text} ...")
            sys.stderr.flush()
        try:
            yield
        finally:
            if self.enabled:
                sys.stderr.write(f" {time.perf_counter() - start:.1f}s\n")
                sys.stderr.flush()


def _json_arg(value: str | None, what: str) -> str | None:
    """A JSON string, or the path of a file holding one."""
    if value is None:
        return None
    stripped = value.strip()
    if stripped.startswith(("{", "[")) or not stripped:
        return value
    path = Path(value)
    if not path.is_file():
        if _is_json(stripped):  # null, 3, "x", true: JSON, just not an object (said later)
            return value
        raise CliError(f"{what}: neither JSON nor a readable file: {value!r}")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what}: cannot read {value}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise CliError(f"{what}: {value} is not UTF-8 text (JSON expected): {exc}") from None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _config_option(args: argparse.Namespace) -> dict[str, Any] | None:
    config = _json_arg(args.config, "--config")
    additional = _json_arg(getattr(args, "additional_config", None), "--additional-config")
    if config is not None:
        return {"weight_prefetch_config": config}
    if additional is not None:
        return {"additional_config": additional}
    return None


MAX_TOKENS = 1 << 17  # 128 Ki tokens: beyond any context length, and a bounded input
DEFAULT_MODEL, DEFAULT_TOKENS = "llama-tiny", 16
# what `plan --from-dir` uses: any other plan option given beside it is a usage error
FROM_DIR_OPTIONS = frozenset({"command", "from_dir", "format", "output", "no_fold", "quiet"})


def _token_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_TOKENS} tokens, got {value}")
    return value


def _picture_path(value: str | None, option: str, suffix: str) -> Path | None:
    """Check a --svg/--png path before any work: its suffix, and a writable file there."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise CliError(f"{option}: {value} is a directory; expected a file name")
    if path.suffix.lower() != suffix:
        raise CliError(f"{option}: expected a file name ending in {suffix}, got {value!r}")
    if not path.parent.is_dir():
        raise CliError(f"{option}: the directory of {value} does not exist")
    existed = path.exists()
    try:  # the one test that also holds for root and for special file systems
        path.open("ab").close()
    except OSError as exc:
        raise CliError(f"{option}: cannot write {value}: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _device_profile(text: str):
    """A built-in device profile's name or a profile file's path, validated."""
    from fxprefetch.devices.prediction import ProfileError
    from fxprefetch.devices.profile_catalog import resolve_profile

    try:
        return resolve_profile(text)
    except ProfileError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from fxprefetch.devices.calibrate import BUDGET_S, MAX_BUDGET_S, MIN_BUDGET_S
    from fxprefetch.devices.calibrate_sim import SIMULATED
    from fxprefetch.devices.profile_catalog import PROFILES as PROFILES_BY_NAME
    from fxprefetch.presets import PRESETS, preset_names
    from fxprefetch.targets import AUTO, TARGET_NAMES

    parser = _Parser(prog="fxprefetch", description="Weight-prefetch planning for LLM graphs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="compile a tiny model with backend='npu_prefetch', "
        "show its plan, run it and compare with eager",
    )
    # choices are case-insensitive: every name is lower case (--device H200 is h200)
    demo.add_argument(
        "--model", default="llama-tiny", type=str.lower, choices=preset_names(tiny=True)
    )
    demo.add_argument("--target", default=AUTO, type=str.lower, choices=TARGET_NAMES)
    demo.add_argument("--config", help="weight_prefetch_config JSON (or a file holding it)")

    plan = sub.add_parser(
        "plan",
        help="show what weight prefetch will do for a model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {n:18} {p.description}" for n, p in PRESETS.items()),
    )
    plan.add_argument(  # default None: --from-dir must see whether it was given
        "--model",
        help=f"a preset name or the path of a Hugging Face config.json (default: {DEFAULT_MODEL})",
    )
    plan.add_argument(
        "--from-dir",
        metavar="DIR",
        help="render the plans written to DIR (FXPREFETCH_PLAN_DIR) instead of building a model",
    )
    group = plan.add_mutually_exclusive_group()
    group.add_argument("--config", help="weight_prefetch_config JSON (or a file holding it)")
    group.add_argument("--additional-config", help="vllm-ascend --additional-config JSON")
    plan.add_argument(
        "--layers",
        type=_positive_int,
        help="decoder layers to build (default: all for tiny presets, 4 otherwise)",
    )
    plan.add_argument(
        "--tokens",
        type=_token_count,
        help=f"tokens per forward (default {DEFAULT_TOKENS}, at most {MAX_TOKENS})",
    )
    plan.add_argument(
        "--device",
        type=_device_profile,
        metavar="{" + ",".join(PROFILES_BY_NAME) + "} or FILE.json",
        help='plan as a compile on this device would (its cap, windows, "auto" sizes and '
        "which prefetches pay) and print the predicted saving per layer and per step with "
        "every constant's provenance (a model, not a measurement); a built-in profile's name "
        "or a device profile file (fxprefetch calibrate writes one)",
    )
    plan.add_argument("--format", type=str.lower, choices=["table", "json"], default="table")
    plan.add_argument("--output", help="write the table or JSON to this file")
    plan.add_argument(
        "--no-fold", action="store_true", help="one row per linear even for identical layers"
    )
    plan.add_argument("--svg", help="draw the overlap timeline to this SVG file")
    plan.add_argument("--png", help="draw the overlap timeline to this PNG file")
    plan.add_argument("--quiet", action="store_true", help="no progress on stderr")

    calibrate = sub.add_parser(
        "calibrate",
        help="measure this GPU's (or NPU's) constants for the prediction model and write "
        "them as a device profile file (under 2 minutes)",
    )
    calibrate.add_argument(
        "-o", "--output", help="the profile file to write (default: NAME.json here)"
    )
    calibrate.add_argument(
        "--name", type=_profile_name, help="the profile's name (default: e.g. h200-calibrated)"
    )
    calibrate.add_argument(
        "--budget",
        type=_budget,
        default=BUDGET_S,
        help=f"seconds of measuring (default {BUDGET_S:g}, within [{MIN_BUDGET_S:g}, "
        f"{MAX_BUDGET_S:g}]); the rounds are sized to fit",
    )
    calibrate.add_argument(
        "--simulate",
        choices=sorted(SIMULATED),
        help="calibrate a simulated device with known constants instead (no GPU needed: "
        "for dry runs and tests; the file says simulated)",
    )
    calibrate.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _profile_name(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError(
            f"expected lower-case letters, digits, '.', '_' or '-' (at most 64), got {text!r}"
        )
    return text


def _budget(text: str) -> float:
    from fxprefetch.devices.calibrate import MAX_BUDGET_S, MIN_BUDGET_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not MIN_BUDGET_S <= value <= MAX_BUDGET_S:
        raise argparse.ArgumentTypeError(
            f"expected seconds within [{MIN_BUDGET_S:g}, {MAX_BUDGET_S:g}], got {text}"
        )
    return value


def _output_path(value: str) -> Path:
    """A file the profile can be written to, checked before minutes of measuring."""
    path = Path(value)
    if path.is_dir():
        raise CliError(f"--output: {value} is a directory; expected a file name")
    if not path.parent.is_dir():
        raise CliError(f"--output: the directory of {value} does not exist")
    existed = path.exists()
    try:
        path.open("ab").close()
    except OSError as exc:
        raise CliError(f"--output: cannot write {value}: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()
    return path


def run_calibrate(args: argparse.Namespace) -> int:
    """``fxprefetch calibrate``: measure (:mod:`fxprefetch.calibrate`), print the table,
    write the profile file; exit 2 with one line where there is no GPU or NPU."""
    from datetime import UTC, datetime

    from fxprefetch.devices.calibrate import (
        CalibrationError,
        calibrate,
        profile_document,
        render_table,
    )
    from fxprefetch.devices.profile_catalog import match_profile

    output = _output_path(args.output) if args.output else None
    try:
        if args.simulate:
            from fxprefetch.devices.calibrate_sim import SIMULATED, SimulatedDevice

            device = SimulatedDevice(SIMULATED[args.simulate])
        else:
            from fxprefetch.devices.calibrate_hw import detect

            device = detect()
        facts = device.facts()
        name = args.name
        if name is None:
            found = match_profile(facts.name)
            prefix = args.simulate or (found.name if found is not None else facts.kind)
            name = f"{prefix}-{'simulated' if args.simulate else 'calibrated'}"
        output = output or _output_path(f"{name}.json")

        def progress(text: str) -> None:
            if not args.quiet:
                sys.stderr.write(f"calibrate: {text}\n")
                sys.stderr.flush()

        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        result = calibrate(device, budget_s=args.budget, date=date, progress=progress)
    except CalibrationError as exc:
        raise CliError(f"calibrate: {exc}") from None
    document = profile_document(result, name)
    try:
        output.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise CliError(f"--output: cannot write {output}: {exc}") from None
    print(f"{document['label']}: {name}, written to {output}")
    print(render_table(result))
    return 0


def run_plan_dir(args: argparse.Namespace) -> int:
    """``fxprefetch plan --from-dir DIR``: the plans vLLM workers (or anything) wrote there."""
    from fxprefetch.plan.render import render_table, render_totals
    from fxprefetch.plan.store import read_plan_dir

    unusable = [
        "--" + name.replace("_", "-")
        for name, value in vars(args).items()
        if name not in FROM_DIR_OPTIONS and value not in (None, False)
    ]
    if unusable:
        raise CliError(
            f"--from-dir renders plans already written and cannot use {', '.join(unusable)} "
            "(with --from-dir: --format, --output, --no-fold, --quiet)"
        )
    try:
        plans = read_plan_dir(args.from_dir)
    except ValueError as exc:
        raise CliError(f"--from-dir: {exc}") from None
    if not plans:
        raise CliError(f"--from-dir: no plan files (plan-*.json) in {args.from_dir}")
    if args.format == "json":
        text = json.dumps({"plans": [p.to_dict() for p in plans]}, indent=2)
    else:
        text = render_table(plans, fold=not args.no_fold) + "\n" + render_totals(plans)
    _emit(text, args.output)
    return 0


def run_plan(args: argparse.Namespace) -> int:
    if args.from_dir is not None:
        return run_plan_dir(args)
    args.model = DEFAULT_MODEL if args.model is None else args.model
    args.tokens = DEFAULT_TOKENS if args.tokens is None else args.tokens
    from fxprefetch.explainer import explain
    from fxprefetch.options import parse_options
    from fxprefetch.plan.render import render_table, render_totals
    from fxprefetch.presets import PRESETS, build_model, example_inputs, load_config

    options = _config_option(args)
    config = parse_options(options).config if options else None  # validate before building
    pictures = [
        (path, _picture_path(path, option, suffix))
        for path, option, suffix in ((args.svg, "--svg", ".svg"), (args.png, "--png", ".png"))
        if path
    ]
    if args.model.lower() in PRESETS and not Path(args.model).exists():
        args.model = args.model.lower()  # preset names are case-insensitive
    preset = PRESETS.get(args.model)
    layers = args.layers
    total_layers = load_config(args.model).num_hidden_layers
    if layers is not None and layers > total_layers:
        raise CliError(
            f"--layers: {args.model} has {total_layers} decoder layers, got {layers} "
            f"(expected 1 to {total_layers})"
        )
    if layers is None and not (preset and preset.tiny):
        layers = min(4, total_layers)
    progress = Progress(3 + bool(args.svg) + bool(args.png), enabled=not args.quiet)
    with progress.stage(
        f"building {args.model} ({layers or total_layers} of {total_layers} layers, meta device)"
        if not (preset and preset.tiny)
        else f"building {args.model}"
    ):
        model = build_model(
            args.model, layers=layers, device="cpu" if preset and preset.tiny else "meta"
        )
        inputs = example_inputs(model, tokens=args.tokens)
    with progress.stage("tracing and planning"):
        plans = explain(model, config=config, device_profile=args.device, **inputs)
    with progress.stage("rendering"):
        if args.format == "json":
            text = json.dumps(
                {
                    "model": args.model,
                    "layers_built": layers or total_layers,
                    "layers_total": total_layers,
                    "plans": [p.to_dict() for p in plans],
                },
                indent=2,
            )
        else:
            text = render_table(plans, fold=not args.no_fold) + "\n" + render_totals(plans)
            if layers and layers < total_layers:
                text += f"\n(built {layers} of {total_layers} decoder layers; see --layers)"
            if args.device is not None:
                from fxprefetch.plan.predicted_step import StepShape, render_prediction

                shape = StepShape.from_config(load_config(args.model))
                text += "\n\n" + render_prediction(plans, args.device, total_layers, shape)
    for text_path, path in pictures:
        from fxprefetch.plan.timeline import draw_timeline

        with progress.stage(f"drawing {text_path}"):
            try:
                draw_timeline(
                    plans, path, title=f"{args.model}: weight prefetch overlap", device=args.device
                )
            except OSError as exc:
                raise CliError(f"cannot write {text_path}: {exc}") from None
    _emit(text, args.output)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``fxprefetch demo``: see :mod:`fxprefetch.demo`; exit 1 where the demo did not hold up."""
    from fxprefetch.demo import run_demo as demo

    result = demo(args.model, {"target": args.target, **(_config_option(args) or {})})
    print(result.text)
    return 0 if result.passed else 1


def _emit(text: str, output: str | None) -> None:
    if output is None:
        print(text)
        return
    try:
        Path(output).write_text(text + "\n")
    except OSError as exc:
        raise CliError(f"--output: cannot write {output}: {exc}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        commands = {"plan": run_plan, "demo": run_demo, "calibrate": run_calibrate}
        return commands[args.command](args)
    except (CliError, ConfigError) as exc:
        print(f"fxprefetch: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (``| head``): nothing left to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail again
        return 1
    except Exception as exc:
        from fxprefetch.presets import ModelError

        if isinstance(exc, ModelError):
            print(f"fxprefetch: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        if os.environ.get("FXPREFETCH_DEBUG"):
            raise
        print(
            f"fxprefetch: internal error: {type(exc).__name__}: {exc} "
            "(set FXPREFETCH_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
