"""One full EAGLE training step on CPU: both views, all losses, backward, optimizer."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eagle_dist.method.backbone import FrozenViT
from eagle_dist.config import load_config
from eagle_dist.distributed import resolve_precision
from eagle_dist.method.eagle import (
    EagleHeads, augmented_indices, build_optimizer, momentum, param_groups, training_step_losses,
)


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(None, ["data.batch_size=2"])  # official COCO-Stuff defaults
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = FrozenViT(cfg.model.backbone)  # random ViT-S/8
    torch.manual_seed(0)
    heads = EagleHeads(cfg.model, cfg.eicue, cfg.loss, backbone.out_channels)
    batch = {
        "img": torch.randn(2, 3, 224, 224),
        "img_aug": torch.randn(2, 3, 224, 224),
        "label": torch.randint(-1, cfg.model.n_classes, (2, 224, 224)),
    }
    return cfg, backbone, heads, batch


@pytest.mark.parametrize("step", [0, 1000])  # before and after the u switch (NCE on)
def test_full_step_updates_only_trainable_parameters(setup, step):
    cfg, backbone, heads, batch = setup
    optimizer = build_optimizer(heads, cfg.optim, global_batch=2)
    vit_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    heads_before = {k: v.clone() for k, v in heads.named_parameters()}
    heads.train()
    u = momentum(cfg.loss, step)
    out = training_step_losses(backbone, heads, batch, u, precision=resolve_precision("no", "cpu"))
    assert torch.isfinite(out["loss"])
    assert float(out["u"]) == pytest.approx(u) == (0.0 if step == 0 else 0.9)
    out["loss"].backward()
    assert all(p.grad is None for p in backbone.parameters())
    optimizer.step()
    changed = {k for k, v in heads.named_parameters() if not torch.equal(v, heads_before[k])}
    expected_static = {"projection.linear.weight", "projection.linear.bias"} if step == 0 else set()
    assert changed == set(heads_before) - expected_static
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, vit_before[k]), f"backbone tensor {k} changed"
    if step > cfg.loss.step_schedulers:
        assert float(out["loss_nce"]) != 0.0


def test_param_groups_use_official_learning_rates(setup):
    cfg, _, heads, _ = setup
    groups = {g["name"]: g for g in param_groups(heads, cfg.optim, global_batch=64)}
    assert {k: g["lr"] for k, g in groups.items()} == {
        "seg_head": 5e-4, "projection": 5e-4, "linear_probe": 1e-3, "cluster_probe": 5e-3, "eigen_probes": 5e-5,
    }
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(heads.parameters()))
    scaled = load_config(None, ["optim.lr_scaling=linear"])
    groups = {g["name"]: g["lr"] for g in param_groups(heads, scaled.optim, global_batch=128)}
    assert groups["seg_head"] == pytest.approx(1e-3) and groups["linear_probe"] == 1e-3


def test_momentum_switch_is_hard():
    cfg = load_config(None)
    assert momentum(cfg.loss, 200) == 0.0 and momentum(cfg.loss, 201) == 0.9
    pl = load_config(None, ["train.step_unit=pl_optimizer_calls"])
    assert momentum(pl.loss, 28, pl.train.step_unit) == 0.0 and momentum(pl.loss, 29, pl.train.step_unit) == 0.9  # 200 PL counts = 28 batches


def test_eval_prediction_shapes(setup):
    cfg, backbone, heads, batch = setup
    heads.eval()
    out = heads.predict(backbone(batch["img"]), out_size=(224, 224))
    assert out["cluster"].shape == (2, 224, 224)
    assert int(out["cluster"].max()) < cfg.model.n_classes + cfg.model.extra_clusters
    assert int(out["linear"].max()) < cfg.model.n_classes


class _PoolKeys(nn.Module):
    """Stand-in backbone computed image by image with exact arithmetic (pooling, repeat, scale),
    so its keys do not depend on which other images share the batch; counts the images it sees."""

    out_channels = 96

    def __init__(self):
        super().__init__()
        self.scale = torch.linspace(0.5, 2.0, self.out_channels).view(1, -1, 1, 1)
        self.seen = 0

    def forward(self, img):
        self.seen += img.shape[0]
        return F.avg_pool2d(img, 8).repeat(1, self.out_channels // 3, 1, 1) * self.scale


@pytest.fixture(scope="module")
def reuse_setup():
    cfg = load_config(None, ["data.batch_size=4"])
    torch.manual_seed(0)
    heads = EagleHeads(cfg.model, cfg.eicue, cfg.loss, _PoolKeys.out_channels).train()
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(4, 3, 64, 64, generator=gen)
    img_aug = img.clone()
    img_aug[[0, 2]] = torch.randn(2, 3, 64, 64, generator=gen)  # images 1 and 3 are not augmented
    label = torch.randint(-1, cfg.model.n_classes, (4, 64, 64), generator=gen)
    return cfg, heads, {"img": img, "img_aug": img_aug, "label": label}


def _step(cfg, heads, batch):
    backbone = _PoolKeys()
    torch.manual_seed(7)  # the same dropout and correspondence draws in every run
    out = training_step_losses(backbone, heads, batch, momentum(cfg.loss, 1000), precision=resolve_precision("no", "cpu"))
    return out, backbone.seen


@pytest.mark.parametrize("mask", [[True, False, True, False], None])  # from the stream / pixel comparison
def test_backbone_runs_only_on_changed_images_and_the_losses_are_unchanged(reuse_setup, mask):
    cfg, heads, batch = reuse_setup
    full, seen_full = _step(cfg, heads, {**batch, "aug_mask": torch.ones(4, dtype=torch.bool)})
    with_mask = batch if mask is None else {**batch, "aug_mask": torch.tensor(mask)}
    reused, seen = _step(cfg, heads, with_mask)
    assert (seen_full, seen) == (8, 6)
    assert float(full["backbone_passes"]) == 2.0 and float(reused["backbone_passes"]) == 1.5
    # The seg head shares its products across the views that read the same keys (the reused
    # images), which sums the same terms in another order: equal up to float rounding.
    for key, value in full.items():
        if key != "backbone_passes":
            torch.testing.assert_close(reused[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_unaugmented_batch_runs_the_backbone_once(reuse_setup):
    cfg, heads, batch = reuse_setup
    same = {**batch, "img_aug": batch["img"].clone()}
    out, seen = _step(cfg, heads, same)
    assert seen == 4 and float(out["backbone_passes"]) == 1.0
    assert augmented_indices({**same, "aug_mask": torch.zeros(4, dtype=torch.bool)}).numel() == 0
    with pytest.raises(ValueError, match="aug_mask"):
        augmented_indices({**same, "aug_mask": torch.zeros(3, dtype=torch.bool)})


def test_heads_take_their_config_sections_and_the_eigensolver_retry_restores_the_solver(setup):
    cfg, _, heads, _ = setup
    assert (heads.spectral.k, heads.spectral.solver, heads.spectral.sigma) == (
        cfg.model.eigen_k, cfg.eicue.solver, cfg.eicue.color_sigma)
    # EiCue has no parameters: the state dict (checkpoints, official files) is the heads' alone.
    assert not any(key.startswith("spectral") for key in heads.state_dict())
    chosen = load_config(None, ["eicue.solver=eigh", "eicue.color_mode=rgb01"])
    other = EagleHeads(chosen.model, chosen.eicue, chosen.loss, 8)
    assert (other.spectral.solver, other.spectral.color_mode) == ("eigh", "rgb01")
    with pytest.raises(RuntimeError, match="boom"), other.spectral.using_solver("eigh64"):
        assert other.spectral.solver == "eigh64"
        raise RuntimeError("boom")
    assert other.spectral.solver == "eigh"
    with pytest.raises(ValueError, match="solver='lanczos'"), other.spectral.using_solver("lanczos"):
        pass
