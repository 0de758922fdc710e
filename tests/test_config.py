"""Config files: validation errors name the key, overrides win, the shipped files load."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdistill.config import ConfigError, load_config, parse_override
from kdistill.reproduce import PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_file_values_and_overrides_are_applied_in_order(tmp_path):
    path = _write(
        tmp_path,
        '[teacher]\nmodel = "mlp"\nkwargs = { hidden = [32] }\n'
        "[teacher.train]\nepochs = 5\nlr = 1\n[distill]\ntemperature = 8\n",
    )
    config = load_config(path, ["teacher.train.epochs=2", "distill.alpha=1", "data.name=mnist"])
    assert config.teacher.kwargs == {"hidden": [32]}
    assert config.teacher.train.epochs == 2 and config.teacher.train.lr == 1.0
    assert config.distill.temperature == 8.0 and config.distill.alpha == 1.0
    assert config.student.model == "hinton-student"  # untouched sections keep their defaults


@pytest.mark.parametrize(
    "text, message",
    [
        ("[teacher.train]\nlrr = 0.1\n", "unknown key teacher.train.lrr"),
        ("[distill]\ntemperature = -2.0\n", "distill.temperature must be > 0, got -2.0"),
        ("[distill]\nalpha = 1.5\n", r"distill.alpha must be in \[0, 1\], got 1.5"),
        ('[student.train]\nepochs = "ten"\n', "student.train.epochs must be int, got str 'ten'"),
        ("[student.train]\nepochs = 2.5\n", "student.train.epochs must be int, got float"),
        ('[teacher.train]\noptimizer = "adam"\n', "teacher.train.optimizer must be one of sgd"),
        ('[data]\nname = "cifar"\n', "data.name must be one of mnist, fashion-mnist"),
        ("[data]\nlabeled = -1\n", "data.labeled must be >= 0"),
        ("[teacher]\nkwargs = 3\n", "teacher.kwargs must be a table"),
        ("teacher = 3\n", "teacher must be a table"),
        ("[teacher.train]\nepochs = true\n", "teacher.train.epochs must be int, got bool"),
        ("[distill]\ntemperature = nan\n", "distill.temperature must be finite"),
        ("[teacher\n", "is not valid TOML"),
    ],
)
def test_invalid_config_errors_name_the_key_and_value(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_overrides_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(overrides=["teacher.train.epochs"])
    with pytest.raises(ConfigError, match="unknown key distill.temp"):
        load_config(overrides=["distill.temp=3"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_override_values_are_toml_with_bare_words_as_strings():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("data.name=fashion-mnist") == (["data", "name"], "fashion-mnist")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_shipped_config_files_equal_the_builtin_presets(name):
    assert load_config(CONFIGS / f"{name}.toml") == load_config(base=PRESETS[name])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_file_is_valid(path):
    load_config(path)


def test_a_finished_distillation_is_recognised_whatever_the_teacher_paths_spelling(monkeypatch):
    from kdistill.reproduce import phase_signature

    monkeypatch.chdir(CONFIGS.parent)
    relative = load_config(overrides=['distill.teacher="runs/x/model.safetensors"'])
    absolute = load_config(
        overrides=[f'distill.teacher="{CONFIGS.parent}/runs/x/model.safetensors"']
    )
    other = load_config(overrides=['distill.teacher="runs/y/model.safetensors"'])
    assert phase_signature(relative, "distill") == phase_signature(absolute, "distill")
    assert phase_signature(relative, "distill") != phase_signature(other, "distill")
