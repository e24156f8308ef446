"""The typed configs and the `kd-ray` command line: help, overrides, validation messages, shipped YAMLs."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd_ray.cli import STAGES, main
from kd_ray.config import ConfigError, LabelConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "jobs" / "configs"
REQUIRED = ["--corpus.path", "c", "--teachers.0.model", "m", "--output.path", "o"]
REQUIRED_OVERRIDES = {"corpus.path": "c", "teachers.0.model": "m", "output.path": "o"}


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


def test_label_help_documents_each_flag_with_default_and_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["label", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ["--config", "--print-config", "--corpus.path", "--corpus.label_names", "--corpus.bad_rows",
                 "--teachers.0.model", "--teachers.0.max_length", "--compute.batch_size", "--compute.block_rows",
                 "--output.path", "--output.rows_per_file", "--output.overwrite", "--ray.address"]:
        assert flag in out, flag
    assert "Texts per forward pass. | allowed: >= 1, <= 8192 | default: 64" in out
    assert "one of error, skip" in out


def test_console_script_runs():
    script = Path(sys.executable).with_name("kd-ray")
    result = subprocess.run([str(script), "label", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--teachers.0.model" in result.stdout


def test_print_config_prints_the_resolved_yaml(capsys, tmp_path):
    config = tmp_path / "label.yaml"
    config.write_text(yaml.safe_dump({"corpus": {"path": "from-yaml", "normalize": True},
                                      "teachers": [{"model": "yaml-model"}], "output": {"path": "o"}}))
    code = main(["label", "--config", str(config), "--print-config", "--teachers.0.model", "x",
                 "--corpus.label_names", "[a, b]", "--output.overwrite", "true", "--corpus.limit", "5",
                 "--teachers.1.name=second", "--teachers.1.model", "y"])
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["corpus"]["path"] == "from-yaml"  # from the file
    assert printed["corpus"]["normalize"] is True
    assert printed["corpus"]["label_names"] == ["a", "b"]  # YAML list syntax on the command line
    assert printed["corpus"]["limit"] == 5
    assert printed["output"]["overwrite"] is True
    assert [(t["model"], t["name"]) for t in printed["teachers"]] == [("x", "teacher"), ("y", "second")]
    assert printed["compute"]["batch_size"] == 64  # defaults are filled in
    # what is printed loads back into the same config
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert load_config(LabelConfig, tmp_path / "printed.yaml").model_dump() == LabelConfig.model_validate(printed).model_dump()


def test_equals_form_works_for_later_list_elements_in_any_position(capsys):
    assert main(["label", *REQUIRED, "--print-config", "--teachers.1.model=y", "--teachers.1.name=second"]) == 0
    assert [t["name"] for t in yaml.safe_load(capsys.readouterr().out)["teachers"]] == ["teacher", "second"]


def test_unknown_key_names_the_field_and_flag():
    with pytest.raises(ConfigError, match=r"corpus.txt_column: Extra inputs are not permitted.*flag --corpus.txt_column"):
        load_config(LabelConfig, overrides={**REQUIRED_OVERRIDES, "corpus.txt_column": "body"})


def test_wrong_type_names_the_field_the_value_and_the_flag():
    with pytest.raises(ConfigError, match=r"compute.batch_size: .*integer.*\(got 'many'\).*flag --compute.batch_size"):
        load_config(LabelConfig, overrides={**REQUIRED_OVERRIDES, "compute.batch_size": "many"})


def test_out_of_range_and_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(LabelConfig, overrides={"teachers.0.model": "m", "compute.batch_size": 0,
                                            "compute.precision": "fp64", "corpus.bad_rows": "ignore"})
    message = str(info.value)
    assert "compute.batch_size: Input should be greater than or equal to 1 (got 0)" in message
    assert "flag --compute.precision" in message and "'fp64'" in message
    assert "corpus.bad_rows" in message and "'error' or 'skip'" in message
    assert "corpus.path: Field required" in message and "output: Field required" in message


PIPELINE = {"output": "o", "labels": ["a", "b"], "teacher.base_model": "m", "data.test.path": "t.csv",
            "data.train.path": "l.csv", "data.train.id_column": "id", "data.train.label_column": "y",
            "data.transfer.path": "u.csv", "data.transfer.id_column": "id"}


@pytest.mark.parametrize("override, expected", [
    ({"data.transfer.id_column": None}, r"data.transfer.id_column is None but data.train.id_column is 'id'"),
    ({"data.transfer.normalize": True}, r"data.transfer.normalize is True but data.train.normalize is False"),
    ({"data.transfer.label_column": "y"}, r"the transfer set is read without gold"),
])
def test_pipeline_transfer_set_is_read_like_the_labeled_set_and_without_gold(override, expected):
    from kd_ray.config import PipelineConfig
    from kd_ray.stages.pipeline import stages

    with pytest.raises(ConfigError, match=expected):
        load_config(PipelineConfig, overrides={**PIPELINE, **override})
    corpus = {s.name: s for s in stages(load_config(PipelineConfig, overrides=PIPELINE))}["label"].cfg.corpus
    assert (corpus.path, corpus.unlabeled_path, corpus.label_column) == ("l.csv", "u.csv", "y")


def test_a_pipeline_search_in_ray_trains_local_mode_is_refused_by_field():
    from kd_ray.config import PipelineConfig

    tuned = {**PIPELINE, "data.validation.path": "v.csv",
             "tune.space": {"alpha": {"distribution": "uniform", "low": 0.1, "high": 0.9}}}
    with pytest.raises(ConfigError, match=r"distill.num_workers is 0 \(Ray Train's local mode\)"):
        load_config(PipelineConfig, overrides={**tuned, "distill.num_workers": 0})
    assert load_config(PipelineConfig, overrides={**tuned, "distill.num_workers": 1}).tune is not None


@pytest.mark.parametrize("field", ["distill.keep", "teacher.train.keep"])
def test_pipeline_keeping_the_best_epoch_needs_validation_data(field):
    from kd_ray.config import PipelineConfig

    with pytest.raises(ConfigError, match=rf"{field} is 'best'.*data.validation is not set"):
        load_config(PipelineConfig, overrides={**PIPELINE, field: "best"})
    cfg = load_config(PipelineConfig, overrides={**PIPELINE, field: "best", "data.validation.path": "v.csv"})
    assert cfg.distill.keep == "best" or cfg.teacher.train.keep == "best"


def test_yaml_file_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(LabelConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(LabelConfig, tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("corpus: {path: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(LabelConfig, tmp_path / "broken.yaml")


@pytest.mark.parametrize("argv, expected", [
    (["--compute.batch_size", "0"], "compute.batch_size: Input should be greater than or equal to 1"),
    (["--corpus.txt_column", "body"], "flag --corpus.txt_column"),
    (["--teachers.0.max_length", "4"], "teachers.0.max_length: Input should be greater than or equal to 8"),
    (["--teachers.1.model", "y"], "must be unique; ['teacher'] appear more than once"),
    (["--teachers.0.name", "1bad"], "teachers.0.name: String should match pattern"),
    (["stray"], "unrecognised argument 'stray'"),
])
def test_cli_config_errors_exit_2_with_the_message(capsys, argv, expected):
    assert main(["label", *REQUIRED, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-ray label: ")
    assert expected in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- shipped YAMLs


def _stage_of(path: Path) -> str:
    """Stage of a shipped YAML: its file name starts with the stage or its module (label-demo.yaml,
    pipeline-gpu.yaml for `run` in kd_ray.stages.pipeline), else a top-level `stage:` key says it."""
    prefixes = {stage: stage for stage in STAGES}
    modules = [module.rsplit(".", 1)[-1] for module, _, _ in STAGES.values()]
    prefixes.update({m: stage for stage, (module, _, _) in STAGES.items()
                     if modules.count(m := module.rsplit(".", 1)[-1]) == 1 and m not in prefixes})
    for prefix in sorted(prefixes, key=len, reverse=True):
        if path.stem == prefix or path.stem.startswith(prefix + "-"):
            return prefixes[prefix]
    stage = (yaml.safe_load(path.read_text()) or {}).get("stage")
    assert stage in STAGES, f"{path.name}: name it <stage>-*.yaml with a stage in {sorted(STAGES)}"
    return stage


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_into_its_stage_config(path):
    import kd_ray.config

    stage = _stage_of(path)
    module_name, config_name, _ = STAGES[stage]
    assert hasattr(importlib.import_module(module_name), "ENTRY_POINTS")
    if config_name is None:
        pytest.skip(f"stage {stage} takes no config")
    cfg = load_config(getattr(kd_ray.config, config_name), path)
    # every value the file sets reaches the config as written (none dropped, renamed or defaulted)
    loaded = cfg.model_dump(mode="json")
    for dotted, value in _leaves(yaml.safe_load(path.read_text())):
        assert _at(loaded, dotted) == value, f"{path.name}: {dotted} is {value!r} in the file"


def _leaves(tree, prefix: str = ""):
    """(dotted path, value) of every scalar in a YAML tree; lists of scalars count as one value."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def _at(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_opens_with_the_command_that_runs_it(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any("kd-ray" in line or "ray job submit" in line for line in header), \
        f"{path.name} should open with a comment holding the exact command that runs it"


def test_label_demo_config_is_shipped():
    cfg = load_config(LabelConfig, CONFIG_DIR / "label-demo.yaml")
    assert cfg.teachers and cfg.corpus.path and cfg.output.path


def test_help_imports_only_the_config_models():
    """`kd-ray --help` and `kd-ray <stage> --help` load kd_ray.config, not Ray, torch or a stage module."""
    code = ("import sys, contextlib, io\n"
            "from kd_ray.cli import main\n"
            "for argv in (['--help'], ['run', '--help'], ['distill', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'transformers', 'pyarrow')"
            " or m in ('kd_ray.stages.train', 'kd_ray.stages.pipeline', 'kd_ray.stages.label')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_every_flag_a_job_docstring_suggests_is_one_its_stage_accepts(job, capsys):
    """The `--field value` examples in jobs/*.py docstrings parse with that job's stage."""
    import ast
    import re

    doc = ast.get_docstring(ast.parse(job.read_text())) or ""
    stage = re.search(r'main\(\["([a-z]+)"', job.read_text())
    if stage is None:
        pytest.skip(f"{job.name} is not a stage entry point")
    flags = re.findall(r"`(--[a-z_.0-9]+) [^`]+`", doc)
    assert flags, f"{job.name}: its docstring shows no example override"
    with pytest.raises(SystemExit):
        main([stage.group(1), "--help"])
    accepted = set(re.findall(r"(--[a-z_.0-9]+)", capsys.readouterr().out))
    for flag in flags:
        assert flag in accepted, f"{job.name} suggests {flag}, not a flag of `kd-ray {stage.group(1)}`"
