"""Config loading: TOML + overrides, one-line errors naming the field, resolved round trip."""

import pytest

from pretrain.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nmax_steps = 7\n[optim]\nwarmup_steps = 2\n[model.attention]\nwindow = 32\n")
    cfg = load_config(path, ["train.seed=5", "optim.lr=1e-3", "data.sources=['a.jsonl', 'b.txt']",
                             "run.dir=out/x", "checkpoint.interval=3", "model.tie_embeddings=false"])
    assert cfg.train.max_steps == 7 and cfg.model.attention.window == 32
    assert cfg.train.seed == 5 and cfg.optim.lr == 1e-3 and cfg.run.dir == "out/x"
    assert cfg.data.sources == ["a.jsonl", "b.txt"] and cfg.checkpoint.interval == 3
    assert cfg.model.tie_embeddings is False
    assert cfg.model.attention.n_heads == Config().model.attention.n_heads


def test_int_widens_to_float_and_bare_strings():
    cfg = config_from_dict({"optim": {"lr": 1}}, ["optim.schedule=wsd", "run.name=my run"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.schedule == "wsd" and cfg.run.name == "my run"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.toml", ["train.max_steps=31", "model.layer_pattern=['mamba', 'attn:none']"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_pattern_tiles_layers():
    cfg = config_from_dict({"model": {"n_layers": 4, "layer_pattern": "mamba swa:none"}})
    assert cfg.model.pattern() == [("mamba", "mlp"), ("swa", "none"), ("mamba", "mlp"), ("swa", "none")]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.max_stepz=3"], "train.max_stepz"),
        (["nosection.x=1"], "nosection"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.max_steps=1.5"], "train.max_steps"),
        (["model.tie_embeddings=1"], "model.tie_embeddings"),
        (["train.max_steps=0"], "train.max_steps"),
        (["optim.lr=-1"], "optim.lr"),
        (["data.valid_fraction=1.5"], "data.valid_fraction"),
        (["model.attention.n_heads=3"], "model.attention.n_heads"),
        (["model.attention.n_kv_heads=3"], "model.attention.n_kv_heads"),
        (["model.layer_pattern='mamba nope'"], "model.layer_pattern"),
        (["model.n_layers=3"], "model.layer_pattern"),
        (["model.ffn=moe_nope"], "model.ffn"),
        (["train.global_batch_size=12"], "train.global_batch_size"),
        (["data.weights=[1.0, 2.0]"], "data.weights"),
        (["optim.schedule=step"], "optim.schedule"),
        (["model=1"], "model"),
        (["train.seed"], "train.seed"),
        (["parallel.pp=0"], "parallel.pp"),
        (["parallel.pp=7"], "parallel.pp"),  # 7 stages for 6 layers
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=4"], "parallel.pp"),
        (["parallel.pp_schedule=pipedream"], "parallel.pp_schedule"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], "parallel.pp_virtual_stages"),
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble"], "parallel.pp_virtual_stages"),
        (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=3"], "parallel.pp_virtual_stages"),
        (["parallel.pp=2", "parallel.pp_virtual_stages=2"], "parallel.pp_virtual_stages"),
        (["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=1"], "parallel.pp_microbatches"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2",
          "parallel.pp_microbatches=5"], "parallel.pp_microbatches"),
        (["parallel.pp_microbatches=-1"], "parallel.pp_microbatches"),
        (["parallel.pp=2", "parallel.pp_split=[2, 4]"], "parallel.pp_split"),
        (["parallel.pp=3", "parallel.pp_split=[4, 2]"], "parallel.pp_split"),
        (["parallel.pp=3", "parallel.pp_split=[2, 2]"], "parallel.pp_split"),
        (["parallel.pp=2", "parallel.pp_split=[6]"], "parallel.pp_split"),
        (["parallel.pp=2", "parallel.pp_split=[0]"], "parallel.pp_split"),
        (["parallel.pp=2", "parallel.pp_split=['3']"], "parallel.pp_split"),
        (["parallel.pp=2", "parallel.pp_split=['3.mlp']"], "parallel.pp_split"),
        (["parallel.pp=3", "parallel.pp_split=['2.ffn', 2]"], "parallel.pp_split"),
        (["parallel.pp=2", "parallel.pp_split=['6.ffn']"], "parallel.pp_split"),
        (["parallel.pp=2", "model.ffn=none", "parallel.pp_split=['2.ffn']"], "parallel.pp_split"),  # no FFN
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.toml", overrides)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nmax_steps = 1\nlearning_rate = 3\n")
    with pytest.raises(ConfigError, match="train.learning_rate: unknown field"):
        load_config(unknown)


@pytest.mark.parametrize(
    "overrides, stages, microbatches",
    [
        (["parallel.pp=6"], 6, 6),  # one layer per stage; micro-batches default to the stages
        (["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=2"], 2, 2),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=3"], 6, 6),
        # torch's flexible interleaving: 3 micro-batches for 2 ranks are one round of 3
        (["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.pp_virtual_stages=2",
          "parallel.pp_microbatches=3"], 4, 3),
        (["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2",
          "parallel.pp_microbatches=1"], 4, 1),
        (["parallel.pp=3", "parallel.pp_split=[1, 5]"], 3, 3),
        (["parallel.pp=4", 'parallel.pp_split=["0.ffn", 2, "2.ffn"]'], 4, 4),  # inside blocks 0 and 2
    ],
)
def test_possible_pipeline_layouts_load(overrides, stages, microbatches):
    p = load_config("configs/tiny.toml", overrides).parallel
    assert (p.n_stages, p.microbatches) == (stages, microbatches)


def test_pp_split_mixes_layers_and_half_blocks():
    """TOML's mixed arrays: a layer index and an 'L.ffn' cut inside block L, in position order."""
    from pretrain.config import split_position

    p = load_config("configs/tiny.toml", ["parallel.pp=3", 'parallel.pp_split=[2,"3.ffn"]']).parallel
    assert p.pp_split == [2, "3.ffn"]
    assert [split_position(c) for c in (2, "2.ffn", "3.ffn", 4)] == [4, 5, 7, 8]
