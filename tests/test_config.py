"""Config: YAML -> dataclass -> YAML round trip, overrides, and clear rejections."""

import json
from pathlib import Path

import pytest
import yaml

from difflm.config import config_from_dict, dump_yaml, load_config, to_dict
from difflm.errors import DifflmError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_round_trip_yaml_dataclass_yaml(tmp_path):
    cfg = load_config(RECIPES[0], ["model.n_layer=3", "train.lr=3e-4", "diffusion.reweight_cap=10"])
    text = dump_yaml(cfg)
    again = config_from_dict(yaml.safe_load(text))
    assert to_dict(again) == to_dict(cfg)
    assert again.model.n_layer == 3 and again.train.lr == 3e-4 and again.diffusion.reweight_cap == 10.0


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_parses(recipe):
    cfg = load_config(recipe)
    assert to_dict(config_from_dict(to_dict(cfg))) == to_dict(cfg)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.max_steps=50", "train.precision=bf16", "train.resume=null", "data.append_eos=true"])
    assert cfg.train.max_steps == 50 and cfg.train.precision == "bf16"
    assert cfg.train.resume is None and cfg.data.append_eos is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layr=4", "unknown config key 'model.n_layr'; valid keys here:"),
        ("trian.max_steps=4", "unknown config key 'trian'"),
        ("train.max_steps=abc", "config key 'train.max_steps' expects int, got 'abc'"),
        ("train.max_steps=2.5", "expects int"),
        ("train.progress=3", "expects bool"),
        ("train.precision=fp8", "valid choices: fp32, bf16, fp16"),
        ("diffusion.schedule=zigzag", "valid choices: linear, cosine"),
        ("diffusion.min_rate=1.5", "diffusion.min_rate must be in [0, 1]"),
        ("model.family=nope", "'model.family' is 'nope'; valid choices"),
        ("train.max_steps", "not of the form key=value"),
        ("train.max_steps=0", "train.max_steps must be >= 1"),
    ],
)
def test_bad_values_name_the_key_and_the_choices(override, message):
    with pytest.raises(DifflmError, match=None) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(DifflmError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("folder", sorted((Path(__file__).resolve().parents[1] / "zoo").glob("*/difflm.json")))
def test_zoo_configs_load_with_the_old_loss_name(folder):
    """`guidelines` (the elbo loss's old name, stored by the zoo's checkpoints) loads as `elbo`."""
    data = json.loads(folder.read_text(encoding="utf-8"))
    assert config_from_dict(data).diffusion.loss == data["diffusion"]["loss"].replace("guidelines", "elbo")
    assert load_config(None, ["diffusion.loss=guidelines"]).diffusion.loss == "elbo"
