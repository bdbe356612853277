"""DINOv2 backbones from the official weight files (facebookresearch/dinov2) or timm checkpoints.

    from eagle_dist.method.backbone import FrozenViT
    vit = FrozenViT("vit_small_patch14_reg4_dinov2", weights="dinov2_vits14_reg4_pretrain.pth")
    kk = vit(img)            # [B, 3 * 384, H / 14, W / 14]

``model.backbone`` takes the timm name (``vit_{small,base,large,giant}_patch14[_reg4]_dinov2``)
or the official stem (``dinov2_vits14``, ``dinov2_vitb14_reg4``, ...).  The official files differ
from timm's layout in three ways that this module undoes on load:

* ``mask_token`` (used only by DINOv2's masked-image training) is dropped;
* ``register_tokens`` becomes timm's ``reg_token``.  timm's register models keep no position
  for the class token (``no_embed_class``), so the class token's position is added into
  ``cls_token`` once, which is what the official model adds at every forward;
* ViT-g's SwiGLU (``mlp.w12`` / ``mlp.w3``) becomes timm's packed ``mlp.fc1`` / ``mlp.fc2``, and
  chunked training checkpoints (``blocks.<chunk>.<i>.``) are flattened (``i`` is global).

The two families resize their 37 x 37 position table differently for inputs other than 518 px,
as the official hub entry points configure them (:func:`pos_embed_rule`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from eagle_dist.errors import WeightsError

# The official release: stem -> (timm size word, embed dim).
_SIZES = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
_STEM = re.compile(r"^dinov2_vit([sblg])14(_reg(\d+))?$")
_TIMM = re.compile(r"^vit_(small|base|large|giant)_patch14(_reg(\d+))?_dinov2")


@dataclass(frozen=True)
class PosEmbedRule:
    """How a position table is resized to another token grid (bicubic in both families).

    ``offset > 0``: DINO's scale factor ``(n + offset) / g`` (the sampling positions follow the
    scale factor, not the output size); ``offset == 0``: resize to the target size.
    """

    offset: float
    antialias: bool


# DINO (v1) and plain DINOv2: the "+0.1" scale-factor kludge, no antialiasing.
DINO_RULE = PosEmbedRule(offset=0.1, antialias=False)
# DINOv2 with registers (hub: interpolate_offset=0, interpolate_antialias=True).
DINOV2_REG_RULE = PosEmbedRule(offset=0.0, antialias=True)


def timm_name(arch: str) -> str:
    """The timm name for an official stem (``dinov2_vitb14_reg4`` -> ``vit_base_patch14_reg4_dinov2``)."""
    m = _STEM.match(arch)
    if not m:
        return arch
    size = _SIZES[m.group(1)][0]
    return f"vit_{size}_patch14{'_reg' + m.group(3) if m.group(2) else ''}_dinov2"


def is_dinov2(arch: str) -> bool:
    return bool(_TIMM.match(timm_name(arch)))


def register_count(arch: str) -> int:
    m = _TIMM.match(timm_name(arch))
    return int(m.group(3)) if m and m.group(2) else 0


def pos_embed_rule(arch: str) -> PosEmbedRule:
    """The official interpolation of ``arch``'s family (DINO's rule for every non-DINOv2 ViT)."""
    return DINOV2_REG_RULE if is_dinov2(arch) and register_count(arch) else DINO_RULE


def is_official_layout(sd: dict[str, torch.Tensor]) -> bool:
    """A state dict saved from facebookresearch/dinov2 (not from timm)."""
    return "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd)


def _depth(sd: dict[str, torch.Tensor]) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


def describe(sd: dict[str, torch.Tensor]) -> str | None:
    """The timm name a DINOv2 state dict (official or timm layout) fits, or None if it is no DINOv2.

    DINOv2 is recognised by its LayerScale (``ls1.gamma``) with 14-pixel patches.
    """
    proj = sd.get("patch_embed.proj.weight")
    if proj is None or proj.shape[-1] != 14 or not any(k.endswith("ls1.gamma") for k in sd):
        return None
    size = next((name for name, dim in _SIZES.values() if dim == proj.shape[0]), None)
    if size is None:
        return None
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else (
        sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    return f"vit_{size}_patch14{f'_reg{regs}' if regs else ''}_dinov2"


def check_family(sd: dict[str, torch.Tensor], arch: str, path) -> None:
    """One clear error when a DINOv2 file and ``arch`` are of another size, family or generation."""
    fits = describe(sd)
    arch = timm_name(arch)
    if fits is None and is_dinov2(arch):
        raise WeightsError(
            f"{path} is not a DINOv2 checkpoint (no LayerScale ls1.gamma with 14-pixel patches) but "
            f"model.backbone is {arch}. Use the matching DINO name (e.g. vit_small_patch8_224 for "
            "dino_deitsmall8_pretrain.pth) or a dinov2_vit*14*_pretrain.pth file."
        )
    if fits is not None and fits != arch:
        raise WeightsError(
            f"{path} holds a {fits} (DINOv2, {_depth(sd)} blocks) but model.backbone is {arch}. "
            f"Set model.backbone={fits}, or point model.weights at the {arch} file."
        )


def to_timm_layout(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official DINOv2 state dict for the timm model whose state dict is ``own``."""
    out = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        out["reg_token" if key == "register_tokens" else key] = value
    pos = out.get("pos_embed")
    own_pos = own.get("pos_embed")
    if pos is not None and own_pos is not None and pos.shape[1] == own_pos.shape[1] + 1 and "cls_token" in out:
        # The official model adds pos_embed[:, 0] to the class token at every forward; timm's
        # register models have no class position, so it is folded into the token itself.
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out
