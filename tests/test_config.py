import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cemcurate.build import BuildConfig
from cemcurate.common.config import add_config_arguments, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Example:
    size: int = field(default=224, metadata={"help": "edge"})
    name: str | None = field(default=None, metadata={"help": "a name"})
    flag: bool = field(default=True, metadata={"help": "on/off"})
    planes: list[str] = field(default_factory=lambda: ["xy"], metadata={"help": "planes"})

    def __post_init__(self):
        if self.size < 1:
            raise ValueError("size must be positive")


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("size: 64\nname: abc\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    args = parser.parse_args(["--no-flag", "--planes", "xy", "xz"])
    cfg = load_config(Example, cfg_file, vars(args))
    assert cfg == Example(size=64, name="abc", flag=False, planes=["xy", "xz"])
    args = parser.parse_args(["--size", "32"])
    assert load_config(Example, cfg_file, vars(args)).size == 32
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Example, tmp_path / "saved.yaml") == cfg


def test_unknown_keys_and_invalid_values_are_errors(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("sise: 64\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown key\(s\) \['sise'\]"):
        load_config(Example, cfg_file)
    with pytest.raises(ValueError, match="size must be positive"):
        load_config(Example, None, {"size": 0})
    with pytest.raises(ValueError, match="config file not found"):
        load_config(Example, tmp_path / "missing.yaml")


def test_build_yaml_holds_the_paper_defaults():
    assert load_config(BuildConfig, REPO / "configs/curate/build.yaml") == BuildConfig()
