"""Backbone loading: official DINO and timm checkpoint layouts, and clear errors for bad files."""

import warnings

import pytest
import torch

import timm
from eagle_dist.method.backbone import FrozenViT, WeightsError, dino_interpolate_pos_embed

ARCH = "vit_tiny_patch16_224"  # same code path as ViT-S/8, much cheaper


def _reference_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0).eval()


def _keys_of(vit, img):
    """Keys of the last three blocks computed the slow, obvious way for comparison."""
    out = []
    x = vit.patch_embed(img)
    x = vit._pos_embed(x)
    for i, blk in enumerate(vit.blocks):
        if i >= len(vit.blocks) - 3:
            qkv = blk.attn.qkv(blk.norm1(x))
            d = qkv.shape[-1] // 3
            k = qkv[:, 1:, d:2 * d]
            out.append(k.transpose(1, 2).reshape(img.shape[0], d, 14, 14))
        x = blk(x)
    return torch.cat(out, 1)


@pytest.mark.parametrize(
    "layout",
    ["plain", "teacher_backbone", "student_module", "timm_state_dict_with_head"],
)
def test_checkpoint_layouts_load(tmp_path, layout):
    ref = _reference_vit()
    sd = ref.state_dict()
    if layout == "plain":
        obj = sd
    elif layout == "teacher_backbone":  # DINO's training checkpoint: teacher/backbone. + DINO head
        obj = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(3, 3)},
               "epoch": 100}
    elif layout == "student_module":
        obj = {"student": {f"module.backbone.{k}": v for k, v in sd.items()}}
    else:
        obj = {"state_dict": {**sd, "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    vit = FrozenViT(ARCH, weights=path)
    img = torch.randn(2, 3, 224, 224)
    expected = _keys_of(ref, img)
    got = vit(img)
    assert got.shape == (2, 3 * 192, 14, 14)
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.faults
def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not found: .*nope.pth"):
        FrozenViT(ARCH, weights=tmp_path / "nope.pth")


@pytest.mark.faults
def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="could not read"):
        FrozenViT(ARCH, weights=path)
    torch.save({"epoch": 3, "args": "x"}, tmp_path / "nostate.pth")
    with pytest.raises(WeightsError, match="does not contain a state dict"):
        FrozenViT(ARCH, weights=tmp_path / "nostate.pth")


@pytest.mark.faults
def test_wrong_architecture_names_the_keys(tmp_path):
    torch.save(_reference_vit().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(WeightsError) as info:
        FrozenViT("vit_small_patch16_224", weights=tmp_path / "tiny.pth")
    assert "shape mismatch" in str(info.value) and "tiny.pth" in str(info.value)
    sd = _reference_vit().state_dict()
    sd.pop("blocks.3.attn.qkv.bias")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="missing keys: blocks.3.attn.qkv.bias"):
        FrozenViT(ARCH, weights=tmp_path / "partial.pth")


def test_random_init_warns_loudly():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        FrozenViT(ARCH)


def test_frozen_and_no_grad():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = FrozenViT(ARCH)
    vit.train()
    assert not vit.vit.training
    assert all(not p.requires_grad for p in vit.parameters())
    out = vit(torch.randn(1, 3, 64, 96, requires_grad=True))
    assert out.shape == (1, 576, 4, 6) and not out.requires_grad


def test_pos_embed_interpolation_identity_and_shape():
    table = torch.randn(1, 196, 8)
    assert dino_interpolate_pos_embed(table, 14, 14) is table
    assert dino_interpolate_pos_embed(table, 6, 9).shape == (1, 54, 8)
