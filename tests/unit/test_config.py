from pathlib import Path

import pytest

from eagle_dist.config import ConfigError, flatten, from_dict, load_config, parse_override, save_yaml, to_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cocostuff27", "cityscapes27", "potsdam3", "default", "cocostuff27_dinov2_vits14",
                                  "cocostuff27_dinov2_vitb14", "cityscapes27_dinov2_vitb14"])
def test_presets_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.n_classes >= 1


def test_official_values():
    coco = load_config(REPO / "configs" / "cocostuff27.yaml")
    assert (coco.model.extra_clusters, coco.model.eigen_clusters, coco.optim.lr_cluster) == (5, 32, 5e-3)
    city = load_config(REPO / "configs" / "cityscapes27.yaml")
    assert (city.loss.shift_bias, city.loss.feature_samples, city.loss.nce_variant) == (0.11, 28, "cityscapes")
    assert (city.loss.step_schedulers, city.loss.momentum_limit, city.optim.lr_eigen) == (380, 0.7, 5e-4)


def test_overrides_and_types():
    cfg = load_config(None, ["optim.lr=3e-4", "data.batch_size=8", "eicue.color_mode=rgb01", "model.weights=/w.pth"])
    assert cfg.optim.lr == 3e-4 and cfg.data.batch_size == 8
    assert cfg.eicue.color_mode == "rgb01" and cfg.model.weights == "/w.pth"
    assert parse_override("--train.max_steps=5") == ("train.max_steps", 5)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("dist.strategy=fsdp", "'dist.strategy': expected one of 'auto', 'ddp', 'deepspeed'"),
        ("train.max_steps=2.5", "'train.max_steps': expected int"),
        ("loss.pointwise=3", "'loss.pointwise': expected bool"),
        ("model.eigen_k=1", "eigen_k"),
        ("optim.lr", "key.sub=value"),
    ],
)
@pytest.mark.faults
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert needle in str(info.value)


@pytest.mark.faults
def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbon: vit_small_patch8_224\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "model.backbon" in str(info.value) and str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "cityscapes27.yaml", ["train.max_steps=7"])
    save_yaml(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert from_dict(to_dict(cfg)) == cfg
    assert flatten(to_dict(cfg))["train.max_steps"] == 7


def test_dinov2_presets_keep_the_official_grid():
    for name in ("cocostuff27_dinov2_vits14", "cocostuff27_dinov2_vitb14", "cityscapes27_dinov2_vitb14"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        official = load_config(REPO / "configs" / f"{name.split('_')[0]}.yaml")
        # Same token grid in training as the official /8 ViT at its resolution.
        assert cfg.data.resolution // 14 == official.data.resolution // 8, name
        assert "dinov2" in cfg.model.backbone and cfg.loss == official.loss, name


@pytest.mark.faults
def test_resolution_must_be_a_multiple_of_the_patch():
    with pytest.raises(ConfigError, match=r"data.val_resolution=320 is not a multiple of the patch size 14.*use 308 or 322"):
        load_config(REPO / "configs" / "cocostuff27_dinov2_vits14.yaml", ["data.val_resolution=320"])
    with pytest.raises(ConfigError, match="data.resolution=100 is not a multiple of the patch size 8"):
        load_config(None, ["data.resolution=100"])


def test_unset_values_are_null_and_stored_zeros_still_load():
    from eagle_dist.config import Config, ConfigError, from_dict, load_config, to_dict

    cfg = Config()
    assert (cfg.eval.max_batches, cfg.dist.cpu_threads, cfg.dist.zero_stage, cfg.tracking.uri) == (None,) * 4
    with pytest.raises(ConfigError, match="eval.max_batches must be >= 1 or null"):
        load_config(None, ["eval.max_batches=0"])
    assert load_config(None, ["eval.max_batches=null"]).eval.max_batches is None
    stored = to_dict(Config())  # as a checkpoint written before null meant unset spelled it
    stored["eval"]["max_batches"], stored["dist"]["zero_stage"], stored["tracking"]["uri"] = 0, 0, ""
    old = from_dict(stored)
    assert (old.eval.max_batches, old.dist.zero_stage, old.tracking.uri) == (None, None, None)
