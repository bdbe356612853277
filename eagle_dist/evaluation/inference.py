"""Load a trained model from any checkpoint and run it on images: what evaluate, predict and
visualize share (a command-line tool never imports another one).

    from eagle_dist.evaluation.inference import load_model, resolve_checkpoint, segment
    step_dir, how = resolve_checkpoint("runs/NAME")          # newest complete checkpoint
    loaded = load_model(step_dir, device="cpu")
    ids_HW = segment(loaded, PIL.Image.open("photo.jpg").convert("RGB"), 320, probe="cluster")

Any photo size in bounded memory: the ViT sees the photo resized to a fixed shorter side, and
what is done at the photo's full size (upsampling, argmax) works on probe *scores* (one channel
per class or cluster) in row bands (:func:`label_bands`), never on the upsampled 512-channel code
map, which alone would take pixels x 512 x 4 bytes (110 GB for a 9000x6000 photo).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eagle_dist import checkpoint as ckpt_mod
from eagle_dist import config as config_mod
from eagle_dist.checkpoint import CheckpointError
from eagle_dist.config import Config
from eagle_dist.errors import EagleError


class EvaluateError(EagleError, RuntimeError):
    """Bad arguments for evaluation or prediction; the message says what to do."""


class ImageReadError(EagleError, OSError):
    """A file that cannot be read as an image, or one above the pixel limit; the message says why."""


# Pillow's own default: above it Pillow warns of a decompression bomb, above twice it refuses.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


# --------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, str]:
    """The step folder to evaluate and how it was chosen ("last", "step N" or "official checkpoint").

    ``path`` is a run folder (``runs/NAME``), its ``checkpoints`` folder, one step folder, or an
    official EAGLE ``.ckpt`` file.  Only complete checkpoints are taken; nothing is ever chosen
    by a score.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a run folder (runs/NAME), "
                              "a step folder (runs/NAME/checkpoints/step-00000400) or an official EAGLE .ckpt")
    if path.is_file():
        # A file is an official EAGLE checkpoint (eagle-dist's own are folders); load_model reads
        # it with the restricted reader, which refuses anything else with one clear error.
        if step is not None:
            raise EvaluateError(f"--step {step} applies to run folders, not to the checkpoint file {path}")
        return path, "official checkpoint"
    named = ckpt_mod.STEP_DIR_RE.fullmatch(path.name)
    if named or (path / ckpt_mod.STATE_FILE).is_file():
        if step is not None and ckpt_mod.step_dir_name(step) != path.name:
            raise EvaluateError(f"--step {step} contradicts the step folder {path}; give one of the two")
        state = ckpt_mod.read_state(path)  # refuses a folder without its COMPLETE marker
        _verified(path, path.parent)
        return path, f"step {int(named.group(1)) if named else int(state['step'])}"
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = ckpt_mod.complete_checkpoints(root)
    if step is not None:
        target = root / ckpt_mod.step_dir_name(step)
        if not target.is_dir():
            have = ", ".join(str(s) for s, _ in found) or "none"
            raise CheckpointError(f"no checkpoint for step {step} in {root} (complete steps: {have})")
        ckpt_mod.read_state(target)
        _verified(target, root)
        return target, f"step {step}"
    if not found:
        partial = sorted(p.name for p in root.glob("*step-*")) if root.is_dir() else []
        hint = f" (only incomplete folders: {', '.join(partial)})" if partial else ""
        raise CheckpointError(f"no complete checkpoint in {root}{hint}; train first or pass a step folder")
    # The newest is refused too when damaged, not silently replaced by an older one: a score
    # reported for "last" must be the last checkpoint's.
    _verified(found[-1][1], root)
    return found[-1][1], "last"


def _verified(step_dir: Path, root: Path) -> None:
    """Refuse a checkpoint whose files do not match the digests recorded at save time.

    Nothing is moved here (evaluation may run next to a training run that owns the folder);
    training's resume moves damaged checkpoints aside itself.
    """
    try:
        ckpt_mod.verify_checkpoint(step_dir)
    except ckpt_mod.CheckpointDamagedError as err:
        others = [s for s, p in ckpt_mod.complete_checkpoints(root) if p != step_dir]
        hint = f"pass --step N for another one (complete steps: {', '.join(map(str, others))})" if others \
            else "no other complete checkpoint exists"
        raise ckpt_mod.CheckpointDamagedError(
            f"{err}. It is refused: {hint}; `python -m eagle_dist.checkpoint verify {root}` checks them all."
        ) from None


def run_dir_of(step_dir: Path) -> Path:
    """``runs/NAME`` for ``runs/NAME/checkpoints/step-XXXXXXXX``."""
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def _set(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> Config:
    """A config dict with ``key=value`` overrides applied, type-checked."""
    for text in overrides:
        key, value = config_mod.parse_override(text)
        _set(data, key, value)
    return config_mod.from_dict(data)


def checkpoint_config(step_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict]:
    """The resolved training config stored in the checkpoint, with ``key=value`` overrides."""
    state = ckpt_mod.read_state(step_dir)
    data = (state.get("extra") or {}).get("config")
    if data is None:
        saved = run_dir_of(step_dir) / "config.yaml"
        if not saved.is_file():
            raise CheckpointError(f"{step_dir} carries no config and {saved} is missing; "
                                  "the model cannot be rebuilt")
        import yaml

        data = yaml.safe_load(saved.read_text())
    return apply_overrides(data, overrides), state


@dataclass
class LoadedModel:
    cfg: Config
    backbone: torch.nn.Module
    heads: torch.nn.Module
    step_dir: Path
    step: int
    state: dict

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.step_dir)

    @property
    def tag(self) -> str:
        """Names this checkpoint in output paths: ``step-XXXXXXXX``, or an official file's stem."""
        return self.step_dir.stem if self.step_dir.is_file() else self.step_dir.name

    @property
    def eval_dir(self) -> Path:
        """Where evaluate writes by default and predict looks for the Hungarian table."""
        return self.run_dir / "eval" / self.tag


def load_model(step_dir: Path, overrides=(), device: torch.device | str = "cpu", quiet: bool = False) -> LoadedModel:
    """Backbone + heads of a complete checkpoint, in eval mode on `device`.

    The backbone is not in the checkpoint (it is frozen): it is rebuilt from ``model.backbone``
    and ``model.weights``.  Without a weights file the trainer's random initialisation is
    reproduced by seeding exactly as the trainer does before building it.  An official EAGLE
    ``.ckpt`` file carries the backbone, the heads and the config (eagle_dist.method.official).
    """
    from safetensors.torch import load_file

    from eagle_dist.method.eagle import build_model

    if Path(step_dir).is_file():
        return _load_official(Path(step_dir), overrides, device)
    cfg, state = checkpoint_config(step_dir, overrides)
    # The trainer's seeded draw for a random backbone; a run fine-tuned from an official checkpoint
    # (model.init_from) gets that file's frozen backbone.
    backbone, heads = build_model(cfg, quiet=quiet)
    weights = step_dir / ckpt_mod.MODEL_FILE
    try:
        heads.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except (RuntimeError, FileNotFoundError) as err:
        raise CheckpointError(f"the weights in {weights} do not fit the model of its config ({err}); "
                              "did a model.* override change the architecture?") from None
    backbone.to(device).eval()
    heads.to(device).eval()
    return LoadedModel(cfg, backbone, heads, step_dir, int(state["step"]), state)


def _load_official(path: Path, overrides, device) -> LoadedModel:
    """An official EAGLE ``.ckpt``: weights and config from the file (restricted unpickling)."""
    from eagle_dist.method.eagle import build_model
    from eagle_dist.method.official import load_official_checkpoint

    official = load_official_checkpoint(path)
    cfg = apply_overrides(config_mod.to_dict(official.cfg), overrides)
    backbone, heads = build_model(cfg, device, official=official)
    backbone.eval()
    heads.eval()
    state = {"step": official.global_step, "extra": {"official": {
        "epoch": official.epoch, "lightning_version": official.lightning_version, "skipped_keys": official.skipped}}}
    return LoadedModel(cfg, backbone, heads, path, official.global_step, state)


# --------------------------------------------------------------------------- devices, loading


def pick_device(requested: str | None, dist=None) -> torch.device:
    """The device inference runs on: under a launcher (world size > 1) the rank's own device
    (`dist.device`), else `requested` ("cpu", "cuda", "cuda:1" ...), else cuda when available."""
    if dist is not None and dist.world_size > 1:
        if requested and torch.device(requested).type != dist.device.type:
            raise EvaluateError(f"--device {requested}: under a launcher every process uses its own device "
                                f"({dist.device} here); leave out --device (ACCELERATE_USE_CPU=1 forces CPU)")
        return dist.device
    if not requested:
        return dist.device if dist is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise EvaluateError(f"--device {requested!r} is not a device ({err}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f"--device {requested}: no CUDA device is visible; use --device cpu")
    return device


def open_checkpoint(checkpoint: str | os.PathLike, step: int | None, device: torch.device | str,
                    overrides=(), quiet: bool = False) -> tuple[LoadedModel, str]:
    """`resolve_checkpoint` + `load_model`: the model of a run folder, step folder or official file,
    and how its step was chosen."""
    step_dir, selection = resolve_checkpoint(checkpoint, step)
    return load_model(step_dir, overrides, device, quiet=quiet), selection


# --------------------------------------------------------------------------- images


def load_assignment(path: Path, n_clusters: int, step: int | None) -> list[int]:
    data = json.loads(path.read_text())
    table = data.get("strict")
    if not isinstance(table, list) or len(table) != n_clusters:
        raise ValueError(f"{path} holds no strict cluster table for {n_clusters} clusters")
    saved_step = (data.get("checkpoint") or {}).get("step")
    if step is not None and saved_step is not None and int(saved_step) != step:
        raise ValueError(f"{path} was computed for step {saved_step}, not step {step}")
    return [int(c) for c in table]


def model_input(image: Image.Image, short_side: int, patch: int) -> torch.Tensor:
    """``[1, 3, h, w]`` ImageNet-normalised, shorter side ~ `short_side`, sides multiples of `patch`."""
    from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD

    w, h = image.size
    scale = short_side / min(w, h)
    new_w = max(patch, int(round(w * scale / patch)) * patch)
    new_h = max(patch, int(round(h * scale / patch)) * patch)
    rgb = np.asarray(image.resize((new_w, new_h), Image.Resampling.NEAREST), dtype=np.float32) / 255.0
    normed = (rgb - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(normed).permute(2, 0, 1).unsqueeze(0).contiguous()


def open_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The decoded RGB image of `path`; ImageReadError for an unreadable file or one with more
    than `max_pixels` pixels (None: no limit), whose message names ``--max-image-pixels``.

    The size is read from the header and checked before anything is decoded.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the check below replaces Pillow's (same limit, one clear message)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageReadError(
                    f"{path}: {w}x{h} = {w * h:,} pixels is above the limit of {max_pixels:,} pixels (the guard "
                    f"against decompression bombs); if you trust the file, raise it with --max-image-pixels {w * h}")
            im.load()
            # An RGB image is used as decoded: convert() would copy it (4 bytes per pixel).
            return im if im.mode == "RGB" else im.convert("RGB")
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@torch.no_grad()
def low_res_scores(loaded, x: torch.Tensor, probe: str) -> torch.Tensor:
    """``[K, h, w]`` scores on the ViT's token grid whose bilinear upsampling has, at every pixel,
    the argmax of the official prediction (probe applied to the bilinearly upsampled code).

    Linear probe: its logits.  A 1x1 conv is linear and bilinear weights sum to one, so upsampling
    the logits equals the logits of the upsampled code.  Cluster probe: the dot products of the
    code with the unit centroids.  The official cosine divides that by the norm of the upsampled
    code, which does not commute with upsampling, but it is one positive number per pixel, the
    same for every cluster, so the argmax is unchanged.  (Evaluation needs the cosines themselves
    for the CRF; it works on fixed-size crops and keeps the official order, evaluation/loop.py.)
    """
    if probe == "linear" and loaded.heads.linear_probe is None:
        raise EvaluateError("this model was trained without labels (model.n_classes=0): it has no linear probe; "
                            "use probe='cluster'")
    code = loaded.heads.seg_head(loaded.backbone(x))[0]
    if probe == "linear":
        return loaded.heads.linear_probe(code[None])[0]
    unit = F.normalize(loaded.heads.cluster_probe.clusters, dim=1)
    d, h, w = code.shape
    return (unit @ code.reshape(d, h * w)).reshape(-1, h, w)


def _linear_taps(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of 1-d linear interpolation from `n_in` to `n_out` samples with
    ``align_corners=False`` (F.interpolate's coordinates): out[i] = x[i0] + w1[i] (x[i1] - x[i0])
    (= (1 - w1[i]) x[i0[i]] + w1[i] x[i1[i]] up to float rounding)."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0.to(device), i1.to(device), (src - i0).clamp(0, 1).to(device)


def band_rows_for(n_scores: int, width: int, budget: int = 1 << 22) -> int:
    """Rows per band so that one band's scores (`n_scores` x rows x `width` floats) stay near
    `budget` elements (16 MB of float32): memory bounded whatever the photo's size."""
    return max(1, budget // max(1, n_scores * width))


@torch.no_grad()
def label_bands(scores_KHW: torch.Tensor, size: tuple[int, int], band_rows: int | None = None):
    """Yield ``(row0, ids [rows, W] int64 on the CPU)`` of the bilinearly upsampled scores' argmax
    over K at ``size = (H, W)``, one band of rows at a time.

    Every output value is computed by the same element-wise operations from the same low-resolution
    scores whatever the band height, so the labels do not depend on `band_rows` (tested).  Bands
    never straddle two pairs of token rows, so they may be shorter than `band_rows`.
    """
    k, h, w = scores_KHW.shape
    out_h, out_w = size
    band_rows = band_rows or band_rows_for(k, out_w)
    dev = scores_KHW.device
    r0, r1, a1 = _linear_taps(h, out_h, dev)
    c0, c1, b1 = _linear_taps(w, out_w, dev)
    # Scores last ([h, w, K]): the argmax then reduces contiguous memory.
    scores_HWK = scores_KHW.permute(1, 2, 0).contiguous()
    b1 = b1[:, None]
    pairs = list(zip(r0.tolist(), r1.tolist()))
    across: dict[int, torch.Tensor] = {}  # token row -> its [W, K] interpolation along the width

    def across_row(i: int) -> torch.Tensor:
        if i not in across:
            left, right = scores_HWK[i].index_select(0, c0), scores_HWK[i].index_select(0, c1)
            across[i] = left + (right - left) * b1
        return across[i]

    top = 0
    while top < out_h:
        # Output rows between the same two token rows (at most band_rows of them): each is the
        # same two interpolated token rows, mixed with its own weight; one broadcast, no gather.
        end = top + 1
        while end < out_h and end - top < band_rows and pairs[end] == pairs[top]:
            end += 1
        i0, i1 = pairs[top]
        for old in [i for i in across if i < i0]:
            del across[old]
        upper = across_row(i0)
        band = (across_row(i1) - upper) * a1[top:end, None, None]
        band += upper  # separate kernels, never fused: the same rounding whatever the band's shape
        yield top, band.argmax(-1).cpu()
        top = end


@torch.no_grad()
def segment(loaded, image: Image.Image, short_side: int, probe: str, band_rows: int | None = None) -> np.ndarray:
    """Predicted ids ``[H, W]`` (input size, uint8 or uint16) of the cluster or linear probe (cluster
    ids are the segments ``0..model.n_clusters-1`` of a model trained without labels).  Memory:
    the image, the label map and one band of scores (see the module docstring)."""
    device = next(loaded.heads.parameters()).device
    scores = low_res_scores(loaded, model_input(image, short_side, loaded.backbone.patch).to(device), probe)
    out_w, out_h = image.size
    ids = np.empty((out_h, out_w), dtype=np.uint8 if scores.shape[0] <= 256 else np.uint16)
    for top, band in label_bands(scores, (out_h, out_w), band_rows):
        ids[top:top + band.shape[0]] = band.numpy()
    return ids
