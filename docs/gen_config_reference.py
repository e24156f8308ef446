"""Write docs/reference/configuration.md: every field of every stage's config, from the pydantic classes.

    python docs/gen_config_reference.py          # rewrite the reference
    python docs/gen_config_reference.py --check  # exit 1 if the committed file differs (tests/test_docs.py)
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from kd_ray import config
from kd_ray.cli import STAGES, config_sections

OUT = Path(__file__).resolve().parent / "reference" / "configuration.md"


def _type(annotation) -> str:
    inner = config.unwrap_optional(annotation)
    optional = inner is not annotation
    if typing.get_origin(inner) is typing.Literal:
        name = "one of " + ", ".join(f"`{a}`" for a in typing.get_args(inner))
    else:
        name = (inner.__name__ if isinstance(inner, type) and not typing.get_args(inner)
                else str(inner).replace("typing.", "").replace("NoneType", "None"))
    return name + (" or null" if optional else "")


def _allowed(field) -> str:
    bounds = [f"{sym} {getattr(m, attr)}" for m in field.metadata
              for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if getattr(m, attr, None) is not None]
    return ", ".join(bounds)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def reference() -> str:
    lines = ["# Configuration reference", "",
             "Generated from `kd_ray/config.py` by `python docs/gen_config_reference.py`; do not edit by hand "
             "(`tests/test_docs.py` fails when this file and the code differ). Every field is a YAML key (its dotted "
             "path) and a flag of the same name: `kd-ray label --config label.yaml --output.path runs/labels`. "
             "List entries (`teachers.0.model`) take any index.", ""]
    for command, (_, class_name, summary) in STAGES.items():
        if class_name is None:
            continue
        lines += [f"## kd-ray {command}", "", f"{summary} (`{class_name}`)", ""]
        for prefix, section, fields in config_sections(getattr(config, class_name)):
            if not fields:
                continue
            if prefix:
                doc = (section.__doc__ or "").strip().splitlines()[0] if section.__doc__ else ""
                lines += [f"### `{prefix.rstrip('.')}`", "", doc, ""] if doc else [f"### `{prefix.rstrip('.')}`", ""]
            lines += ["| YAML path / flag | type | default | allowed | what it does |", "|---|---|---|---|---|"]
            for dotted, field in fields:
                default = "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)!r}`"
                lines.append(f"| `--{dotted}` | {_cell(_type(field.annotation))} | {_cell(default)} | "
                             f"{_cell(_allowed(field))} | {_cell(field.description or '')} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    text = reference()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.is_file() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10))} lines)")
