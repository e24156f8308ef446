"""The generated configuration reference is the code's: every field of every stage's config, as committed."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "docs"))
import gen_config_reference  # noqa: E402

from kd_ray import config  # noqa: E402
from kd_ray.cli import STAGES, config_sections  # noqa: E402


def test_the_committed_configuration_reference_is_what_the_code_generates():
    assert gen_config_reference.OUT.read_text() == gen_config_reference.reference(), (
        "docs/reference/configuration.md differs from the config classes; run `python docs/gen_config_reference.py`")


def test_the_reference_lists_every_field_of_every_stage():
    text = gen_config_reference.reference()
    for _, class_name, _ in STAGES.values():
        if class_name is None:
            continue
        for _, _, fields in config_sections(getattr(config, class_name)):
            for dotted, _ in fields:
                assert f"| `--{dotted}` |" in text, (class_name, dotted)
