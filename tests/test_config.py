"""The one config mechanism: defaults <- YAML <- command line, with unknown keys and bad types named."""
from __future__ import annotations

import ast
import concurrent.futures
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

from semivlm.config import ConfigError, load_config


@dataclass
class Example:
    output_dir: str = ""
    learning_rate: float = 1e-3
    max_steps: int = 10
    tensorboard: bool = False
    model_config: dict = field(default_factory=dict)
    targets: list[str] = field(default_factory=lambda: ["q_proj"])


def test_command_line_overrides_yaml_which_overrides_defaults(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("learning_rate: 3e-4\nmax_steps: 50\nmodel_config: {hidden_size: 64}\n")
    cfg = load_config(Example, ["--config", str(yml), "--max_steps", "7", "--targets", "[a, b]", "--tensorboard"])
    assert cfg.learning_rate == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string; it must still be a float
    assert cfg.max_steps == 7 and cfg.tensorboard is True and cfg.targets == ["a", "b"]
    assert cfg.model_config == {"hidden_size": 64}
    assert load_config(Example, ["--output_dir=001"]).output_dir == "001"
    assert load_config(Example, ["--targets", "/data/papers"]).targets == ["/data/papers"]


def test_unknown_yaml_key_names_the_file_and_key(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("learningrate: 1.0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'learningrate' \(did you mean 'learning_rate'\?\)"):
        load_config(Example, ["--config", str(yml)])


def test_unknown_command_line_key_and_bad_type_are_named():
    with pytest.raises(ConfigError, match="command line: unknown key 'max_step'"):
        load_config(Example, ["--max_step", "3"])
    with pytest.raises(ConfigError, match="key 'max_steps' must be an integer, got 'many'"):
        load_config(Example, ["--max_steps", "many"])
    with pytest.raises(ConfigError, match="expected --key value"):
        load_config(Example, ["stray"])


def test_missing_or_malformed_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(Example, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Example, ["--config", str(bad)])


@dataclass
class Base:
    # where checkpoints go
    output_dir: str = ""
    learning_rate: float = 1e-3  # peak, after warmup


@dataclass
class Script(Base):
    """A script's config, documented by comments."""

    # data

    train_data: list[str] = field(default_factory=list)  # JSONL files

    max_steps: int = 10  # optimizer steps
    learning_rate: float = 0.0


def test_help_lists_each_field_with_type_default_and_comment_grouped_by_class(capsys):
    with pytest.raises(SystemExit) as stop:
        load_config(Script, ["--max_steps", "3", "-h"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "[--config FILE.yaml] [--field value ...]" in out.splitlines()[0]
    assert "A script's config, documented by comments." in out
    # the subclass's groups (a comment header, then a blank-line group) before its base's; an overridden field is
    # shown once, under the subclass, with its default there and the base's comment
    assert re.search(r"\nScript: data\n  --train_data list\[str\] = \[\]  # JSONL files\n\n"
                     r"Script\n  --max_steps int = 10  # optimizer steps\n"
                     r"  --learning_rate float = 0.0  # peak, after warmup\n\n"
                     r"Base\n  --output_dir str = \"\"  # where checkpoints go\n$", out), out


def test_a_misspelt_key_suggests_the_close_field_and_points_to_help():
    with pytest.raises(ConfigError, match=r"unknown key 'learnig_rate' \(did you mean 'learning_rate'\?\); --help"):
        load_config(Example, ["--learnig_rate", "1"])


def _config_fields(script: Path) -> tuple[str, set[str]]:
    """The config class a script hands to load_config and its fields, read from the sources (bases resolved
    through `from semivlm.x import Base`), independently of the help text."""
    tree = ast.parse(script.read_text())
    # the class its entry point parses (a bench may also call load_config for another script's config)
    name = (re.search(r"main\(load_config\((\w+)", script.read_text())
            or re.search(r"load_config\((\w+)", script.read_text())).group(1)
    classes = {n.name: (n, tree) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    for imp in (n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0):
        path = REPO / (imp.module.replace(".", "/") + ".py")
        if path.is_file() and any(a.name in {b.id for c, _ in classes.values() for b in c.bases
                                             if isinstance(b, ast.Name)} for a in imp.names):
            other = ast.parse(path.read_text())
            classes.update({n.name: (n, other) for n in ast.walk(other) if isinstance(n, ast.ClassDef)})
    fields, todo = set(), [name]
    while todo:
        cls, _ = classes[todo.pop()]
        fields |= {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
        todo += [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in classes]
    return name, fields


def test_every_script_answers_help_with_all_its_fields():
    scripts = [p for pattern in ("*.py", "data_prep/*.py", "bench/*.py") for p in sorted(REPO.glob(pattern))
               if "load_config(" in p.read_text()]
    assert len(scripts) >= 10, scripts  # the train_*, evaluate, export, data_prep and bench scripts

    def run(script: Path):
        return subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(scripts, pool.map(run, scripts)))
    for script, done in results.items():
        where = script.relative_to(REPO)
        assert done.returncode == 0, f"{where}: {done.stderr[-2000:]}"
        assert done.stdout.startswith(f"usage: {script.name} [--config FILE.yaml]"), where
        name, fields = _config_fields(script)
        assert name in done.stdout and fields, (where, name, fields)
        missing = [f for f in fields if not re.search(rf"^  --{f} ", done.stdout, re.M)]
        assert not missing, f"{where}: --help leaves out {missing}"
