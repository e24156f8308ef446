"""The `kd-ray` command: one subcommand per stage, each driven by its typed config.

Every field of a stage's config is a flag named by its dotted YAML path
(``--corpus.path``, ``--teachers.0.model``); flags override the ``--config`` YAML.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
import typing
from typing import Any, Callable

import yaml
from pydantic import BaseModel

from kd_ray import __version__, config, console
from kd_ray.config import ConfigError, load_config
from kd_ray.errors import unwrap_user_error

# subcommand -> (module with ENTRY_POINTS, config model in kd_ray.config or None, one-line help). Only
# kd_ray.config is imported to build the parser: `kd-ray --help` does not load Ray, torch or a stage.
STAGES: dict[str, tuple[str, str | None, str]] = {
    "label": ("kd_ray.stages.label", "LabelConfig",
              "Run teacher model(s) over a corpus with Ray Data; write raw logits as Parquet."),
    "finetune": ("kd_ray.stages.train", "FinetuneConfig",
                 "Fine-tune a teacher classifier on gold labels with Ray Train + Accelerate."),
    "distill": ("kd_ray.stages.train", "DistillConfig", "Train a small student on soft labels with Ray Train + Accelerate."),
    "tune": ("kd_ray.stages.tune", "TuneConfig",
             "Search temperature, alpha and learning rate with Ray Tune (ASHA), one Train run per trial."),
    "evaluate": ("kd_ray.stages.evaluate", "EvaluateConfig",
                 "Compare teacher and student on a held-out labeled set; write metrics.json."),
    "run": ("kd_ray.stages.pipeline", "PipelineConfig", "Run the whole job from one YAML: finetune, label, distill, evaluate."),
    "export": ("kd_ray.stages.export", "ExportConfig",
               "Export a trained model to ONNX (and int8) with its tokenizer and labels; check it against PyTorch."),
    "predict": ("kd_ray.stages.predict", "PredictConfig",
                "Write a trained model's label and probabilities per task for every post of a corpus, as Parquet."),
    "serve": ("kd_ray.stages.serve", "ServeConfig",
              "Answer HTTP posts with a trained model's labels and probabilities (a Ray Serve application)."),
    "report": ("kd_ray.stages.report", None, "Write an HTML page with plots (and the plots as PNG) for a run folder."),
    "validate": ("kd_ray.data.soft_labels", None, "Check a soft-label folder: schema, metadata, ids, finite logits."),
}


def _field_help(field) -> str:
    parts = [field.description or ""]
    annotation = config.unwrap_optional(field.annotation)
    if typing.get_origin(annotation) is typing.Literal:
        parts.append("one of " + ", ".join(map(str, typing.get_args(annotation))))
    bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata
              for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if getattr(m, attr, None) is not None]
    if bounds:
        parts.append("allowed: " + ", ".join(bounds))
    parts.append("required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}")
    return " | ".join(p for p in parts if p).replace("%", "%%")


def config_sections(model: type[BaseModel], prefix: str = ""):
    """(dotted prefix, section class, [(dotted path, field)]) for ``model`` and every section inside it, in
    declaration order: what the flags and the generated reference (docs/gen_config_reference.py) list."""
    fields, nested = [], []
    for name, field in model.model_fields.items():
        dotted = prefix + name
        section = config.section_in(field.annotation)
        list_section = config.section_in(field.annotation, list)
        if section is not None:
            nested.append((section, dotted + "."))
        elif list_section is not None:
            # documented for the first element; any index works (see _parse_extra)
            nested.append((list_section, dotted + ".0."))
        else:
            fields.append((dotted, field))
    yield prefix, model, fields
    for section, dotted in nested:
        yield from config_sections(section, dotted)


def _add_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for prefix, section, fields in config_sections(model):
        group = parser.add_argument_group(prefix.rstrip(".") or "options", section.__doc__ if prefix else None)
        for dotted, field in fields:
            group.add_argument("--" + dotted, dest=dotted, default=argparse.SUPPRESS, metavar="VALUE",
                               help=_field_help(field))


def _parse_value(raw: str) -> Any:
    # YAML scalars so that "true", "3", "0.5", "null" and "[a, b]" mean what they say.
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _parse_extra(extra: list[str]) -> dict[str, Any]:
    """Accept ``--teachers.1.model x`` style flags for list elements beyond the documented first."""
    overrides, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ConfigError(f"unrecognised argument {token!r}; run with --help to see the flags")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            key, value = token[2:], extra[i + 1]
            i += 2
        else:
            raise ConfigError(f"flag {token} needs a value")
        overrides[key] = _parse_value(value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-ray",
        description="Knowledge distillation of text classifiers on Ray: label a corpus with a big teacher, "
        "train a small student on its soft labels, tune and evaluate it.",
        epilog="Each subcommand takes --config FILE.yaml; any field can be overridden as --<yaml.path> VALUE. "
        "Example: kd-ray label --config jobs/configs/label-demo.yaml --output.path runs/labels",
    )
    parser.add_argument("--version", action="version", version=f"kd-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, config_name, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        p.add_argument("--config", metavar="FILE.yaml", help="YAML config for this stage.")
        p.add_argument("--print-config", action="store_true", help="Print the resolved config and exit.")
        p.add_argument("--verbose", action="store_true", help="Show Ray's and the libraries' output on the console "
                       f"instead of only in the log file (also: {console.VERBOSE_ENV}=1).")
        if config_name is not None:
            _add_flags(p, getattr(config, config_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    entry: Callable = importlib.import_module(args._module).ENTRY_POINTS[args.command]
    config_name = STAGES[args.command][1]
    if config_name is None:  # commands that take positional paths, e.g. validate
        return _run(lambda: entry(extra), args.command, log=None)
    try:
        overrides = {k: _parse_value(v) for k, v in vars(args).items()
                     if k not in {"command", "config", "print_config", "verbose", "_module"}}
        overrides.update(_parse_extra(extra))
        cfg = load_config(getattr(config, config_name), args.config, overrides)
    except ConfigError as e:
        print(f"kd-ray {args.command}: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.dump_config(cfg), end="")
        return 0
    if args.verbose or console.verbose():
        return _run(lambda: entry(cfg), args.command, log=None)
    log = console.log_path(getattr(cfg.output, "path", cfg.output), args.command)
    with console.quiet(log):
        console.say(f"kd-ray {args.command}: Ray's and the libraries' output goes to {log} (--verbose shows it)")
        code = _run(lambda: entry(cfg), args.command, log)
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # Ray's log forwarding ends before the console is given back
        return code


def _run(call: Callable[[], int | None], command: str, log) -> int:
    """Run a stage; its exit code. A failure prints kd-ray's one-line error, and where the whole log is when quiet."""
    try:
        code = call()
        return code if isinstance(code, int) else 0  # a stage's main returns its report
    except Exception as e:  # Ray wraps errors raised in its workers; show the user's cause plainly
        user_error = unwrap_user_error(e)
        if user_error is None and log is None:
            raise
        if user_error is None:
            traceback.print_exc()  # into the log
            lines = str(e).strip().splitlines()
            console.say(f"kd-ray {command}: failed: {type(e).__name__}: {lines[-1] if lines else ''}", err=True)
        else:
            console.say(f"kd-ray {command}: error: {user_error}", err=True)
        if log is not None:
            console.say(f"kd-ray {command}: the full log (Ray's and the workers' output too): {log}", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
