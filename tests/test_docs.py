"""The documentation is the code's: the generated configuration reference as committed, and every command the
pages show a real one (parsed and its config loaded as `kd-ray` would, without running it; no Ray)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "docs"))
import gen_config_reference  # noqa: E402

from kd_ray import config  # noqa: E402
from kd_ray.cli import STAGES, _parse_extra, _parse_value, build_parser, config_sections  # noqa: E402
from kd_ray.config import ConfigError, load_config  # noqa: E402


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


# ------------------------------------------------------------------ the pages' command examples

DOCS = REPO / "docs"
GETTING_STARTED = DOCS / "getting-started.md"
# what main() in kd_ray/cli.py takes out of the parsed flags before the rest become config overrides
CLI_OPTIONS = {"command", "config", "print_config", "verbose", "_module"}


def bash_commands(page: Path) -> list[str]:
    """Each command of the page's ```bash blocks (admonitions' indented ones too): continuation lines
    joined; comments and blank lines dropped."""
    commands = []
    for indent, body in re.findall(r"^( *)```bash\n(.*?)^\1```", page.read_text(), flags=re.MULTILINE | re.DOTALL):
        lines = [line[len(indent):] for line in body.splitlines()]
        for command in "\n".join(lines).replace("\\\n", " ").splitlines():
            if shlex.split(command, comments=True):
                commands.append(command)
    return commands


def page_configs(page: Path) -> dict[str, str]:
    """YAML blocks a page asks the reader to save: those opening with `# <name>.yaml`."""
    blocks = re.findall(r"^```yaml\n# (\S+\.yaml)\b.*?\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return dict(blocks)


def check_kd_ray(args: list[str], page: Path, tmp_path: Path) -> None:
    """As `kd-ray ARGS` would run, up to the loaded config: the subcommand, its flags, its config."""
    if not args or args[0] in {"-h", "--help", "--version"}:
        return
    assert args[0] in STAGES, f"{page.name}: no subcommand kd-ray {args[0]}"
    if {"-h", "--help"} & set(args):
        return
    try:
        parsed, extra = build_parser().parse_known_args(args)
    except SystemExit:
        pytest.fail(f"{page.name}: kd-ray {' '.join(args)} does not parse")
    class_name = STAGES[args[0]][1]
    if class_name is None:  # report, validate: folders, no flags
        assert extra and not [a for a in extra if a.startswith("-")], f"{page.name}: kd-ray {' '.join(args)}"
        return
    overrides = {k: _parse_value(v) for k, v in vars(parsed).items() if k not in CLI_OPTIONS}
    overrides.update(_parse_extra(extra))
    path = parsed.config and REPO / parsed.config
    if path and not path.is_file():  # a config the page shows, for the reader to save
        written = page_configs(page)
        assert parsed.config in written, f"{page.name}: --config {parsed.config}: no such file, nor a yaml block"
        path = tmp_path / parsed.config
        path.write_text(written[parsed.config])
    try:
        load_config(getattr(config, class_name), path, overrides)
    except ConfigError as e:
        pytest.fail(f"{page.name}: kd-ray {' '.join(args)}:\n{e}")


def check_command(command: str, page: Path, tmp_path: Path, *, strict: bool) -> None:
    argv = shlex.split(command, comments=True)
    while re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value before the command
        argv = argv[1:]
    if argv[:3] == ["ray", "job", "submit"]:  # the job's own command follows `--`
        argv = argv[argv.index("--") + 1:]
    program, args = argv[0], argv[1:]
    if program in {"kd-ray", ".venv/bin/kd-ray"}:
        check_kd_ray(args, page, tmp_path)
    elif program == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.MULTILINE))
        assert set(args) <= targets, f"{page.name}: make {' '.join(args)}: no such target in the Makefile"
    elif program in {"python", ".venv/bin/python"} and args and args[0].startswith("jobs/"):
        script = REPO / args[0]
        assert script.is_file(), f"{page.name}: {args[0]} does not exist"
        stage = re.search(r'main\(\["(\w+)"', script.read_text())  # a job entry point: `kd-ray <stage>`
        if stage:
            check_kd_ray([stage.group(1), *args[1:]], page, tmp_path)
    elif program == "kubectl" and args[:1] == ["apply"]:
        files = [args[i + 1] for i, a in enumerate(args) if a == "-f"]
        assert files and all((REPO / f).is_file() for f in files), f"{page.name}: {command}"
    elif program == "source":
        assert args == [".venv/bin/activate"], f"{page.name}: {command}"
    else:
        assert not strict, f"{page.name}: `{command}` is not a command this test knows how to check"


def test_every_command_of_the_getting_started_page_is_a_real_one(tmp_path):
    commands = bash_commands(GETTING_STARTED)
    assert len(commands) >= 8, commands
    for command in commands:
        check_command(command, GETTING_STARTED, tmp_path, strict=True)


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_kd_ray_command_of_the_docs_parses(page, tmp_path):
    for command in bash_commands(page):
        check_command(command, page, tmp_path, strict=False)


def test_the_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in link]
    assert links and [link for link in links if link.startswith("docs/")]
    missing = [link for link in links if link and not (REPO / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_the_performance_page_holds_the_readme_tables():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import readme_tables

    page = (DOCS / "performance.md").read_text()
    for table in readme_tables.tables():
        assert table in page, "docs/performance.md: paste `python benchmarks/readme_tables.py`'s output\n" + table


# ------------------------------------------------------------------ the getting-started page, run

# appended to each `kd-ray run` of the page: the test's models and a scale that runs in seconds
SMALL = {"teacher.train.epochs": 1, "teacher.train.num_workers": 0, "teacher.train.max_length": 32,
         "teacher.max_length": 32, "student.num_layers": 1, "student.ffn_size": None, "distill.epochs": 1,
         "distill.num_workers": 0, "distill.max_length": 32, "distill.keep": "last", "eval.max_length": 32,
         "eval.timing_rows": 40, "eval.timing_repeats": 1, "baseline_without_distillation": False}


@pytest.mark.slow
def test_the_getting_started_commands_run_as_written(tmp_path, tiny_teacher, ray_session):
    """Every `kd-ray` command of the getting-started page runs, as written, in a folder that holds the files the
    page names (small ones: the demo's four splits, my-posts.csv, my-data/ and the page's my-posts.yaml), with
    the test's teacher and a small scale appended as flags; `make demo`'s run is its own command with them."""
    import json
    import subprocess

    import yaml
    from conftest import _csv

    for name, n, labeled in [("train", 60, True), ("transfer", 80, False), ("validation", 30, True), ("test", 30, True)]:
        (tmp_path / "data/vader").mkdir(parents=True, exist_ok=True)
        _csv(tmp_path / f"data/vader/{name}.csv", n, seed=n, with_labels=labeled)
    (tmp_path / "my-data").mkdir()
    for name, n, labeled in [("labeled", 60, True), ("posts", 80, False), ("validation", 30, True), ("test", 30, True)]:
        _csv(tmp_path / f"my-data/{name}.csv", n, seed=n + 1, with_labels=labeled)
    _csv(tmp_path / "my-posts.csv", 40, seed=5, with_labels=False)
    (tmp_path / "jobs/configs").mkdir(parents=True)
    demo_config = yaml.safe_load((REPO / "jobs/configs/pipeline-demo.yaml").read_text())
    (tmp_path / "jobs/configs/pipeline-demo.yaml").write_text(yaml.safe_dump(demo_config))
    for name, text in page_configs(GETTING_STARTED).items():
        (tmp_path / name).write_text(text)
    small = [f"--{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
             for k, v in {**SMALL, "teacher.base_model": tiny_teacher}.items()]
    ray = ["--ray.address", ray_session.get_runtime_context().gcs_address]
    kd_ray = str(Path(sys.executable).with_name("kd-ray"))
    make_demo = ["run", "--config", "jobs/configs/pipeline-demo.yaml"]  # what `make demo` runs after its data
    commands = [make_demo] + [shlex.split(c, comments=True)[1:] for c in bash_commands(GETTING_STARTED)
                              if c.startswith("kd-ray ")]
    assert [c[0] for c in commands] == ["run", "report", "validate", "run", "run", "run"], commands
    for args in commands:
        extra = small + ray if args[0] == "run" and "--print-config" not in args else []
        done = subprocess.run([kd_ray, *args, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"kd-ray {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    for run in ("demo", "my-posts", "my-data"):
        assert (tmp_path / "runs" / run / "report.html").is_file() and (tmp_path / "runs" / run / "student").is_dir()
    metrics = json.loads((tmp_path / "runs/my-posts/metrics.json").read_text())
    assert metrics["labeling"]["rows"] == 60 + 40  # the demo's labeled posts and yours
