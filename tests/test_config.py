"""Config loading: YAML + dotted overrides, strict validation with precise messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import ConfigError, dump_yaml, from_dict, load_config, param, to_dict
from pipeline.infotok import InfoTokConfig


@dataclass
class OptimConfig:
    lr: float = param(1e-4, gt=0, help="peak learning rate")
    betas: list[float] = param(default_factory=lambda: [0.9, 0.95])
    schedule: Literal["cosine", "constant"] = param("cosine")


@dataclass
class RunConfig:
    name: str = param("run")
    steps: int = param(10, ge=1)
    resume: str | None = param(None)
    optim: OptimConfig = field(default_factory=OptimConfig)
    infotok: InfoTokConfig = field(default_factory=InfoTokConfig)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_nested_configs(tmp_path):
    path = write(tmp_path, "steps: 20\noptim:\n  lr: 3.0e-4\ninfotok:\n  mode: cs\n")
    cfg = load_config(
        RunConfig,
        path,
        ["optim.lr=1e-5", "infotok.beta_u=2", "resume=auto", "optim.betas=[0.8, 0.9]"],
    )
    assert cfg.steps == 20
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.infotok.mode == "cs" and cfg.infotok.beta_u == 2.0
    assert cfg.resume == "auto"
    assert load_config(RunConfig, path, ["resume=null"]).resume is None


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = load_config(RunConfig, None, ["infotok.lam=0.5"])
    again = load_config(RunConfig, write(tmp_path, dump_yaml(cfg)))
    assert again == cfg
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_unknown_key_names_file_path_and_closest_key(tmp_path):
    path = write(tmp_path, "infotok:\n  beta_uu: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert str(path) in msg and "infotok.beta_uu" in msg and "did you mean 'beta_u'" in msg


def test_unknown_override_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_config(RunConfig, None, ["optim.lrr=1"])


def test_wrong_type_names_the_key_and_expectation(tmp_path):
    path = write(tmp_path, "steps: ten\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: steps: expected an integer, got 'ten'"):
        load_config(RunConfig, path)
    with pytest.raises(ConfigError, match=r"infotok\.gather_negatives: expected a boolean"):
        load_config(RunConfig, None, ["infotok.gather_negatives=maybe"])


def test_out_of_range_values_fail_with_the_bound(tmp_path):
    with pytest.raises(ConfigError, match=r"infotok\.beta_g: expected a number >= 0, got -1\.0"):
        load_config(RunConfig, None, ["infotok.beta_g=-1"])
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number > 0"):
        load_config(RunConfig, write(tmp_path, "optim: {lr: 0}\n"))


def test_choices_are_enforced_with_a_suggestion():
    with pytest.raises(
        ConfigError,
        match=r"infotok\.mode: expected one of 'off', 'cs', 'csa', got 'csaa'.*did you mean 'csa'",
    ):
        load_config(RunConfig, None, ["infotok.mode=csaa"])


def test_post_init_errors_name_the_section():
    with pytest.raises(ConfigError, match=r"infotok: decoder_hidden \(30\) must be divisible"):
        load_config(RunConfig, None, ["infotok.decoder_hidden=30"])


def test_malformed_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(RunConfig, None, ["steps"])
    with pytest.raises(ConfigError, match="steps is a value, not a section"):
        load_config(RunConfig, None, ["steps.x=1"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(RunConfig, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="infotok: expected a mapping"):
        load_config(RunConfig, write(tmp_path, "infotok: 3\n"))


def test_yaml_boolean_words_still_select_a_choice(tmp_path):
    assert load_config(RunConfig, None, ["infotok.mode=off"]).infotok.mode == "off"
    assert load_config(RunConfig, write(tmp_path, "infotok: {mode: off}\n")).infotok.mode == "off"


# -- model.options: the family's typed options, overridden like every other key -----------------

TRAIN_KEYS = ["data.i2t=[d]", "data.t2i=[d]"]


def _train_config(recipe: str, *overrides: str):
    from pipeline.recipe import load_train_config

    return load_train_config(recipe, [*TRAIN_KEYS, *overrides])


def test_dotted_model_options_merge_into_the_recipe():
    cfg = _train_config(
        "configs/openuni_b_512.yaml",
        "model.options.trainable=[llm]",
        "model.options.gradient_checkpointing=true",
    )
    recipe = _train_config("configs/openuni_b_512.yaml").model.options
    assert cfg.model.options == {**recipe, "trainable": ["llm"], "gradient_checkpointing": True}
    assert {"internvl_path", "sana_path"} <= set(recipe)
    mapping = _train_config("configs/openuni_b_512.yaml", "model.options={trainable: [llm]}")
    assert mapping.model.options == {**recipe, "trainable": ["llm"]}
    nested = _train_config("configs/tiny_showo2.yaml", "model.options.llm.num_hidden_layers=3")
    assert nested.model.options["llm"] == {"num_hidden_layers": 3}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.options.trainabel=[llm]",
            r"model\.options\.trainabel: unknown key .*did you mean 'trainable'\?",
        ),
        (
            "model.options.trainable=[lm]",
            r"model\.options\.trainable\[0\]: expected one of 'llm', 'flow_head'",
        ),
        (
            "model.options.llm.hidden_size=wide",
            r"model\.options\.llm\.hidden_size: expected an integer",
        ),
        (
            "model.options.llm.hidden_size=-4",
            r"model\.options\.llm\.hidden_size: expected an integer > 0",
        ),
        ("model.preset=huge", r"model\.preset: unknown Show-o2 preset 'huge'"),
        (
            "model.family=showo3",
            r"model\.family: unknown family 'showo3' \(available: harmon, openuni, showo2\)",
        ),
    ],
)
def test_model_options_are_validated_by_the_family_with_one_line_naming_the_key(override, message):
    with pytest.raises(
        ConfigError, match=r"configs/tiny_showo2\.yaml \+ command line: " + message
    ) as info:
        _train_config("configs/tiny_showo2.yaml", override)
    assert "\n" not in str(info.value)
