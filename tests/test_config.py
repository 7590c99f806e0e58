"""The one config mechanism: defaults <- YAML <- command line, with unknown keys and bad types named."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

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
