"""The frozen DINO ViT: attention keys of the last three blocks ("KK" features).

    from eagle_dist.method.backbone import FrozenViT
    vit = FrozenViT("vit_small_patch8_224", weights="dino_deitsmall8_300ep_pretrain.pth")
    kk = vit(img)            # [B, 3 * embed_dim, H / patch, W / patch]

Keys are read by forward hooks on ``blocks[i].attn.qkv`` of the last three blocks: the hook keeps
the key slice of that projection (pre-attention LayerNorm input, qkv bias included, before scaling
and softmax; ALGORITHM.md 3.1) and nothing else, so no attention maps or other block outputs are
held in memory.  Channel order is block-major, then ``head * head_dim + d``.

Inputs of another size than the position table use the official interpolation of the model's
family: DINO and plain DINOv2 resize bicubically with ``scale_factor = ((h + 0.1) / g, (w + 0.1)
/ g)``, which is not what timm's dynamic image size does; DINOv2 with registers resizes to the
size with antialiasing (eagle_dist/method/dinov2.py).  So we run the token preparation ourselves
and reuse timm's blocks.

Weights come from a local file (official DINO or DINOv2 ``.pth``, or a timm checkpoint), loaded
with ``weights_only=True``.  Without a file the ViT is randomly initialised with a loud warning.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

from eagle_dist.errors import WeightsError, key_list
from eagle_dist.method import dinov2

_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Find the ViT state dict inside the containers DINO and timm checkpoints use."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path} does not contain a state dict (expected a dict of tensors, possibly under "
            f"one of {', '.join(_WRAPPER_KEYS)}); pass an official DINO .pth or a timm checkpoint"
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:  # prefixes can be stacked, e.g. "module.backbone."
        changed = False
        for prefix in _PREFIXES:
            inside = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            # DINO's training checkpoints keep "backbone.*" beside the DINO head ("head.*"):
            # the backbone part alone is the ViT.
            if inside and (len(inside) == len(sd) or prefix == "backbone."):
                sd = inside
                changed = True
    return sd


def load_vit_weights(vit: nn.Module, path: str | Path, arch: str) -> None:
    """Load a DINO / DINOv2 / timm ViT checkpoint into the timm model ``arch`` strictly.

    Classifier and DINO heads are left out; official DINOv2 files are renamed to timm's layout.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"backbone weights file not found: {path}. Download the official DINO checkpoint "
            "(e.g. https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth "
            f"for ViT-S/8) to {path} or set model.weights to its path; model.weights=null runs a randomly "
            "initialised ViT instead (the pipeline works, the results mean nothing)."
        )
    try:
        if path.suffix == ".safetensors":  # e.g. the backbone of a converted official checkpoint
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated zip, not a torch file at all
        raise WeightsError(f"could not read {path} as a PyTorch checkpoint: {err}") from None
    sd = _unwrap_state_dict(obj, path)
    own = vit.state_dict()
    dinov2.check_family(sd, arch, path)
    if dinov2.is_official_layout(sd):
        sd = dinov2.to_timm_layout(sd, own)
    # DINO teacher/student checkpoints carry their projection head ("head.*"); timm checkpoints
    # may carry a classifier.  The backbone has neither.
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(("head.", "fc_norm.", "head_drop."))}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {key_list(unexpected)}")
        if mismatched:
            parts.append(
                "shape mismatch: "
                + key_list([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched])
            )
        raise WeightsError(
            f"{path} does not fit the backbone architecture; " + "; ".join(parts)
            + ". Check model.backbone matches the checkpoint (e.g. vit_small_patch8_224 for "
            "dino_deitsmall8, vit_base_patch8_224 for dino_vitbase8, vit_small_patch14_reg4_dinov2 "
            "for dinov2_vits14_reg4)."
        )
    vit.load_state_dict(sd, strict=True)


def dino_interpolate_pos_embed(pos_patch: torch.Tensor, h: int, w: int, offset: float = 0.1,
                               antialias: bool = False) -> torch.Tensor:
    """The official bicubic resize of the [1, g*g, C] patch position table to an h x w grid.

    The defaults are DINO's (and plain DINOv2's) rule; ``offset=0, antialias=True`` is the rule
    of DINOv2 with registers (:mod:`eagle_dist.method.dinov2`).
    """
    n = pos_patch.shape[1]
    g = int(math.sqrt(n))
    if g * g != n:
        raise ValueError(f"position table of {n} entries is not a square grid")
    if h == g and w == g:
        return pos_patch
    # The official models resize in float32 whatever the table's dtype.
    grid = pos_patch.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if offset:
        # The +0.1 and the use of a scale factor (not a target size) are DINO's; both change the
        # sampling positions, so parity needs them.
        size: dict[str, Any] = dict(scale_factor=((h + offset) / g, (w + offset) / g))
    else:
        size = dict(size=(h, w))
    grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=antialias, **size)
    if grid.shape[-2:] != (h, w):
        raise ValueError(f"position embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos_patch.dtype)


class FrozenViT(nn.Module):
    """A timm ViT in eval mode without gradients, returning the keys of its last blocks."""

    def __init__(
        self,
        arch: str = "vit_small_patch8_224",
        weights: str | Path | None = None,
        n_blocks: int = 3,
        fused_attn: bool = True,
    ):
        super().__init__()
        arch = dinov2.timm_name(arch)  # official DINOv2 stems are accepted too
        try:
            vit: Any = timm.create_model(arch, pretrained=False, num_classes=0)  # typed as Any below
        except RuntimeError as err:
            raise WeightsError(f"timm does not know the model '{arch}': {err}") from None
        if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed") or not hasattr(vit, "pos_embed"):
            raise WeightsError(f"'{arch}' is not a timm VisionTransformer (no blocks/patch_embed/pos_embed)")
        if weights:
            load_vit_weights(vit, weights, arch)
        else:
            warnings.warn(
                f"\n{'!' * 78}\n  NO BACKBONE WEIGHTS GIVEN: {arch} is RANDOMLY INITIALISED.\n"
                "  Results are meaningless for EAGLE; set model.weights to the official DINO\n"
                f"  checkpoint.  (Fine for tests and the synthetic demo.)\n{'!' * 78}",
                stacklevel=2,
            )
        for block in vit.blocks:
            block.attn.fused_attn = fused_attn
        vit.eval().requires_grad_(False)
        self.vit = vit
        self.arch = arch
        self.pos_rule = dinov2.pos_embed_rule(arch)
        self.embed_dim = vit.embed_dim
        self.patch = vit.patch_embed.patch_size[0]
        self.n_prefix = getattr(vit, "num_prefix_tokens", 1)
        self.key_blocks = list(range(len(vit.blocks) - n_blocks, len(vit.blocks)))
        self.out_channels = n_blocks * vit.blocks[0].attn.qkv.out_features // 3
        self._keys: dict[int, torch.Tensor] = {}
        for i in self.key_blocks:
            vit.blocks[i].attn.qkv.register_forward_hook(self._make_hook(i))

    def _make_hook(self, index: int):
        def hook(_module, _inputs, out):
            width = out.shape[-1] // 3
            self._keys[index] = out[:, self.n_prefix:, width:2 * width]
        return hook

    def train(self, mode: bool = True):
        # Frozen means frozen: the ViT never leaves eval mode (no dropout / drop-path).
        super().train(mode)
        self.vit.eval()
        return self

    def _tokens(self, img: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        vit = self.vit
        x = vit.patch_embed.proj(img)
        h, w = x.shape[-2:]
        x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = vit.pos_embed
        n_pos_prefix = 0 if getattr(vit, "no_embed_class", False) else self.n_prefix
        pos_patch = dino_interpolate_pos_embed(pos[:, n_pos_prefix:], h, w, self.pos_rule.offset,
                                               self.pos_rule.antialias)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
        if n_pos_prefix:
            x = torch.cat(prefix + [x], dim=1) + torch.cat([pos[:, :n_pos_prefix], pos_patch], dim=1)
        else:
            x = torch.cat(prefix + [x + pos_patch], dim=1)
        x = vit.norm_pre(vit.pos_drop(x))
        return x, h, w

    def _to_map(self, tokens_BNC: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return tokens_BNC.transpose(1, 2).reshape(tokens_BNC.shape[0], -1, h, w)

    @torch.no_grad()
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Keys of the last blocks, concatenated: [B, n_blocks * embed_dim, h, w]."""
        self._keys.clear()
        x, h, w = self._tokens(img)
        last = self.vit.blocks[self.key_blocks[-1]]
        for block in self.vit.blocks[: self.key_blocks[-1]]:
            x = block(x)
        if isinstance(last, VitBlock) and hasattr(last.attn, "qkv"):
            # The last key block is needed only up to its qkv projection (the hook takes the
            # keys there): its attention and MLP would be ~7 % of the ViT-S/8 forward, unused.
            cast(Any, last.attn).qkv(last.norm1(x))
        else:
            last(x)
        keys = [self._to_map(self._keys[i], h, w) for i in self.key_blocks]
        self._keys.clear()
        return torch.cat(keys, dim=1).float()

    @torch.no_grad()
    def forward_with_tokens(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and the official "token features" (block outputs through the final norm).

        The token features only feed a dead branch of the official code (quirk 3); they are
        kept here for parity checks and feature analysis, never for training.
        """
        self._keys.clear()
        x, h, w = self._tokens(img)
        feats = []
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i in self.key_blocks:
                feats.append(self._to_map(self.vit.norm(x)[:, self.n_prefix:], h, w))
        keys = [self._to_map(self._keys[i], h, w) for i in self.key_blocks]
        self._keys.clear()
        return torch.cat(keys, dim=1).float(), torch.cat(feats, dim=1).float()
