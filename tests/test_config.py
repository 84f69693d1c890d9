"""Config paths: defaults, recipe loading, flag and --set precedence and typing, and each error message."""

import json

import pytest

from models.config import ModelConfig
from pretrain.config import (
    Config,
    DataConfig,
    TrainConfig,
    config_from_dict,
    resolve,
)
from pretrain.errors import UserError
from pretrain.recipes import list_recipes, read_recipe, recipe_description


def test_defaults_are_the_dataclass_defaults():
    cfg = config_from_dict({})
    assert cfg.objective.name == "clm"
    assert cfg.model == ModelConfig() and cfg.data == DataConfig() and cfg.train == TrainConfig()


def test_every_field_has_a_default_and_a_comment():
    import dataclasses
    import inspect

    for cls in (ModelConfig, DataConfig, TrainConfig, Config):
        src = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            if cls is not Config:
                assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            line = next(ln for ln in src.splitlines() if ln.strip().startswith(f"{f.name}:"))
            assert "#" in line, f"{cls.__name__}.{f.name} has no one-line meaning"


def test_recipe_loading_and_default_recipe():
    cfg, sources = resolve(recipe="gpt2")
    assert cfg.model.n_layers == 12 and cfg.model.d_model == 768 and cfg.data.seq_len == 1024
    assert cfg.train.betas == (0.9, 0.95) and cfg.recipe == "gpt2"
    assert ("model.n_layers", 12, "recipe") in sources
    # no recipe: the objective's CPU-sized default recipe
    cfg, _ = resolve(objective="clm")
    assert cfg.recipe == "gpt2-tiny" and cfg.model.max_len == 128


def test_every_recipe_builds_and_has_a_description():
    names = list_recipes()
    assert {"gpt2", "gpt2-tiny"} <= set(names)
    for n in names:
        cfg, _ = resolve(recipe=n)
        assert recipe_description(n), n
        assert cfg.objective.positions_needed(cfg.data.seq_len) <= cfg.model.max_len, n


def test_precedence_defaults_recipe_flags_set():
    cfg, sources = resolve(recipe="gpt2-tiny", flags={"train.max_steps": 7, "train.seed": 3},
                           sets=["train.max_steps=9", "model.dropout=0.25", "train.betas=0.8,0.9",
                                 "train.compile=true", "data.tokenizer_type=bpe"])
    assert cfg.train.max_steps == 9  # --set beats the flag
    assert cfg.train.seed == 3 and cfg.model.dropout == 0.25 and cfg.train.betas == (0.8, 0.9)
    assert cfg.train.compile is True and cfg.data.tokenizer_type == "bpe"
    assert dict((k, s) for k, _, s in sources)["train.max_steps"] == "--set"
    assert dict((k, s) for k, _, s in sources)["train.seed"] == "flag"


def test_to_dict_round_trips_through_json():
    cfg, _ = resolve(recipe="gpt2", sets=["train.lr=1e-3"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_objective_flag_replaces_the_recipe_objective():
    cfg, _ = resolve(recipe="gpt2-tiny", objective="clm")
    assert cfg.objective.name == "clm"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"sets": ["train.lrr=1"]}, ["train.lrr", "did you mean 'lr'", "valid keys"]),
        ({"sets": ["modle.n_layers=2"]}, ["modle", "did you mean 'model'"]),
        ({"sets": ["train.lr=fast"]}, ["train.lr", "number", "fast"]),
        ({"sets": ["train.max_steps=1.5"]}, ["train.max_steps", "integer"]),
        ({"sets": ["train.compile=maybe"]}, ["train.compile", "true or false"]),
        ({"sets": ["train.optimizer=adam"]}, ["train.optimizer", "'adamw'", "did you mean 'adamw'"]),
        ({"sets": ["train.schedule=cosin"]}, ["'cosine'", "did you mean"]),
        ({"sets": ["train.betas=0.9"]}, ["train.betas", "2 values"]),
        ({"sets": ["train.lr"]}, ["--set", "section.key=value"]),
        ({"sets": ["lr=3"]}, ["section.key"]),
        ({"sets": ["train.lr=-1"]}, ["train.lr", "> 0"]),
        ({"sets": ["model.d_model=100", "model.n_heads=3"]}, ["d_model", "divisible", "n_heads"]),
        ({"sets": ["data.valid_fraction=0.9"]}, ["data.valid_fraction", "(0, 0.5)"]),
        ({"sets": ["model.dropout=1.5"]}, ["model.dropout", "[0, 1)"]),
        ({"objective": "clmm"}, ["unknown objective 'clmm'", "did you mean 'clm'"]),
        ({"recipe": "gtp2"}, ["unknown recipe 'gtp2'", "did you mean 'gpt2'"]),
        ({"recipe": "missing/file.toml"}, ["does not exist"]),
        ({"sets": ["objective.nope=1"]}, ["objective.nope", "valid keys"]),
    ],
)
def test_errors_name_the_key_and_the_choices(kwargs, words):
    with pytest.raises(UserError) as e:
        resolve(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_recipe_toml_and_unknown_section(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        read_recipe(str(bad))
    odd = tmp_path / "odd.toml"
    odd.write_text("[trian]\nlr = 1.0\n")
    with pytest.raises(UserError, match="unknown section 'trian'.*did you mean 'train'"):
        resolve(recipe=str(odd))
    typed = tmp_path / "typed.toml"
    typed.write_text('[train]\nmax_steps = "many"\n')
    with pytest.raises(UserError, match="train.max_steps must be an integer"):
        resolve(recipe=str(typed))
