"""One typed config tree for eagle-dist.

Nested dataclasses are the schema; YAML files in ``configs/`` are partial overlays on the
defaults; ``key.sub=value`` strings on the command line override both.  Unknown keys and wrong
types are errors that name the key and what is allowed.

    from eagle_dist.config import load_config
    cfg = load_config("configs/cocostuff27.yaml", ["optim.lr=3e-4", "data.batch_size=16"])

The defaults are the official COCO-Stuff-27 hyperparameters (ALGORITHM.md section 10).
Reference quirks of the official code are named flags whose default is the official behaviour
(STYLE.md principle 9); each flag's comment says what the fixed behaviour is.

Units: every step count (``train.max_steps``, intervals, ``loss.step_schedulers``) counts
optimizer steps, one per global batch, unless ``train.step_unit`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from eagle_dist.errors import EagleError

# The allowed values of the choice fields, defined here only: other modules derive their lists
# from these (typing.get_args), e.g. distributed.STRATEGIES, eicue.EIGEN_SOLVERS.
ColorMode = Literal["official", "rgb01"]
EigenSolver = Literal["eigh", "eigh64", "krylov"]
SignRule = Literal["official", "per_vector"]
Strategy = Literal["auto", "ddp", "deepspeed"]
MixedPrecision = Literal["auto", "no", "bf16"]
StepUnit = Literal["batch", "pl_optimizer_calls"]
CpuAllocator = Literal["reuse", "system"]


class ConfigError(EagleError, ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    # Any timm ViT name; the official runs use vit_small_patch8_224 (COCO) / vit_base_patch8_224.
    # DINOv2: vit_{small,base,large,giant}_patch14[_reg4]_dinov2 or the official stem
    # (dinov2_vits14, dinov2_vitb14_reg4, ...); each family gets its official pos-embed resize.
    backbone: str = "vit_small_patch8_224"
    # Local weights file: official DINO .pth (plain, teacher/student, module./backbone. prefixes),
    # official DINOv2 .pth, or a timm checkpoint.  None = random init (a loud warning; only for
    # tests and the demo).
    weights: Optional[str] = None
    # Start from an official EAGLE checkpoint (.ckpt of the official code, e.g. a released
    # model): its backbone and every head replace the initial weights, so a new run fine-tunes
    # the released model on new data.  The architecture keys must match the file's
    # (model.backbone, dim, n_classes, extra_clusters, eigen_k, eigen_clusters).  Resuming this run
    # later still takes the backbone from here (eagle-dist checkpoints hold the heads only).
    init_from: Optional[str] = None
    # timm's fused (SDPA) attention: same keys within ~1e-5; the keys are taken before attention.
    fused_attn: bool = True
    dim: int = 512  # segmentation head width D
    dropout: float = 0.1  # Dropout2d probability in the head; 0 disables it
    # Classes of the shards' labels.  0 = no labels (unlabeled mode): the cluster probe has
    # `n_clusters` centroids and there is no linear probe.  Training switches to 0 by itself when
    # the training shards carry no labels (a folder of photos) and says so once.
    n_classes: int = 27
    extra_clusters: int = 5  # with labels, the cluster probe has n_classes + extra_clusters centroids
    # Segments of the cluster probe in unlabeled mode (n_classes = 0): how many kinds of region
    # `predict` tells apart.  Ordinary photos hold ~5-15 kinds of stuff and things; unused
    # segments stay empty, so err on the large side.
    n_clusters: int = 12
    eigen_k: int = 4  # eigenpairs kept; the first (trivial) one is dropped
    eigen_clusters: int = 32  # eigen cluster probe size (`eigen_cluster_out`)

    @property
    def unlabeled(self) -> bool:
        """No labels: no linear probe, no supervised metrics (see `n_classes`)."""
        return self.n_classes == 0

    @property
    def cluster_count(self) -> int:
        """Centroids of the cluster probe: the segments `predict` writes."""
        return self.n_clusters if self.unlabeled else self.n_classes + self.extra_clusters


@dataclass
class EiCueConfig:
    # Quirk 7: "official" feeds ImageNet-normalised pixels / 255 to the colour kernel (an almost
    # constant affinity); "rgb01" de-normalises to [0, 1] RGB first (a real colour kernel).
    color_mode: ColorMode = "official"
    color_sigma: float = 0.1
    # Quirk 8: the augmented view's graph uses the colour of the un-augmented image.  True uses
    # the augmented (blurred) pixels instead.
    color_from_aug_view: bool = False
    # "krylov" (default): the block Krylov solver for the k smallest pairs only
    # (method/eigensolvers.py), 20-30x faster than eigh on 784-token graphs and on a GPU not one
    # matrix at a time; trained models match eigh's within the seed spread (docs/performance.md).
    # "eigh": batched fp32 torch.linalg.eigh, the official solver (the parity tests use it);
    # "eigh64": the same in fp64.
    solver: EigenSolver = "krylov"
    # Sign quirk: "official" negates an image's whole [N, K] eigenvector block when more than half
    # (not all) of its entries are positive, so a vector's sign depends on the solver's output
    # and on the other vectors; "per_vector" makes each eigenvector's largest-magnitude entry
    # positive, which makes eigh and krylov give the same maps up to float rounding.
    sign_rule: SignRule = "official"


@dataclass
class LossConfig:
    contrastive_temp: float = 0.07
    global_loss_weight: float = 0.7  # gamma: share of the crosswise term
    local_pos_weight: float = 0.85
    local_pos_aug_weight: float = 0.85
    # Quirk 11 / section 5: prototypes are batch-wide medoids per EiCue id.
    centroid_mode: Literal["prototype", "medoid", "mean"] = "prototype"
    # Quirk 11: "batch" pools pixels by EiCue id across the whole batch (official); "image" gives
    # every image its own prototypes (the per-image ablation).
    prototype_scope: Literal["batch", "image"] = "batch"
    # Quirk 12: "per_pixel" is the COCO branch (kappa-weighted per-pixel CE); "cityscapes" is the
    # official Cityscapes branch (label-smoothed CE reduced to a scalar before the kappa weighting).
    nce_variant: Literal["per_pixel", "cityscapes"] = "per_pixel"
    feature_samples: int = 11
    neg_samples: int = 5
    pos_inter_weight: float = 0.25
    neg_inter_weight: float = 0.63
    shift_value: float = 3.5
    shift_bias: float = 0.0
    pointwise: bool = True
    zero_clamp: bool = True
    stabalize: bool = True  # (sic) the official key name
    # Quirk 13: the adaptive shifts carry gradient through mean(code correlation).  True detaches.
    detach_shift: bool = False
    correspondence_weight: float = 1.0
    # u switches from 0 to momentum_limit after step_schedulers steps (a hard switch).
    step_schedulers: int = 200
    momentum_limit: float = 0.9


@dataclass
class OptimConfig:
    # One Adam (default betas, no weight decay) with a named group per module; equivalent to
    # the official seven Adams because Adam's state is per parameter.
    lr: float = 5e-4  # segmentation head
    lr_proj: float = 5e-4  # projection head
    lr_linear: float = 1e-3
    lr_cluster: float = 5e-3
    lr_eigen: float = 5e-5  # both eigen cluster probes
    # Learning rates above are for `reference_global_batch`.  "none" keeps them whatever the
    # world size (official behaviour); "linear" / "sqrt" scale head and projection lrs by
    # (global batch / reference) or its square root.  Probes are never scaled.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_global_batch: int = 64  # COCO: 32 per GPU x 2 GPUs
    grad_clip: float = 0.0  # max global grad norm; 0 = off (official)


@dataclass
class DataConfig:
    train_shards: str = "shards/cocostuff27/train"
    # Empty: none.  Labelled runs need validation shards; unlabeled runs (model.n_classes = 0)
    # then evaluate on the training shards (unaugmented, the first eval.max_batches batches).
    val_shards: str = "shards/cocostuff27/val"
    resolution: int = 224
    val_resolution: int = 320
    batch_size: int = 32  # per rank
    val_batch_size: int = 16  # per rank (official: batch_size / 2)
    num_workers: int = 4
    shuffle_buffer: int = 1000
    blur_p: float = 0.5  # probability of the official 3x3 Gaussian blur on the augmented view


@dataclass
class TrainConfig:
    run_name: str = "eagle"
    output_dir: str = "runs"
    max_steps: int = 10000
    # "batch": one step = one optimizer step on one global batch (eagle-dist, PL <= 1.5).
    # "pl_optimizer_calls": step counts in this config follow PL >= 1.6 manual optimisation, where
    # each of the 7 official optimizers counts; counts are divided by 7 to get batches.
    step_unit: StepUnit = "batch"
    log_interval: int = 10
    eval_interval: int = 100
    ckpt_interval: int = 500
    keep_last: int = 3
    seed: int = 0
    resume: bool = True  # resume from the newest complete checkpoint of this run
    max_bad_steps: int = 5  # consecutive NaN/Inf losses before stopping with a checkpoint
    # A run folder's LOCK whose holder on another node stopped its heartbeat this long ago is
    # taken over (eagle_dist/engine/runlock.py); same-host and same-Slurm-job holders are
    # recognised at once.
    lock_stale_s: float = 600.0
    # Under Slurm the run folder is <run_name>-<job id>: a requeued job (same id) finds its
    # checkpoints and two submissions never share a folder.  False keeps <run_name> itself
    # (`eagle-dist sweep` names every run folder, so a later submission continues it).
    job_id_in_run_name: bool = True


@dataclass
class DistConfig:
    # "auto": DeepSpeed when the accelerate config selects it, else DDP.
    strategy: Strategy = "auto"
    zero_stage: Optional[int] = None  # 1 or 2; None = the accelerate config's stage, else 2
    # "auto": bf16 autocast on a GPU with native bf16, fp32 elsewhere; "bf16": bf16 autocast
    # wherever asked, CPU included (distributed.resolve_precision).  Eigendecompositions are fp32.
    mixed_precision: MixedPrecision = "auto"
    # Refuse to start unless this many processes are running.
    expected_world_size: Optional[int] = None  # None: trust the launcher
    cpu_threads: Optional[int] = None  # torch threads per process; None = cores / processes on this node
    # CPU runs: "reuse" keeps freed host memory in the process (no page faults on the big
    # tensors of every step; see distributed.keep_freed_host_memory), "system" the C library's default.
    cpu_allocator: CpuAllocator = "reuse"


@dataclass
class TrackingConfig:
    # MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite in the run folder.
    uri: Optional[str] = None
    experiment: str = "eagle-dist"
    # Nest a new MLflow run under this run (`eagle-dist sweep` sets its parent run here).
    parent_run_id: Optional[str] = None


@dataclass
class EvalConfig:
    max_batches: Optional[int] = None  # None = the whole validation stream
    flip: bool = False  # flip TTA (official final protocol: True; in-training validation: False)
    crf: bool = False
    cluster_alpha: float = 4.0  # softmax temperature of the cluster probe before the CRF


@dataclass
class Config:
    dataset: str = "cocostuff27"
    model: ModelConfig = field(default_factory=ModelConfig)
    eicue: EiCueConfig = field(default_factory=EiCueConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- type checking


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads a bare no/off/false (yes/on/true) as a bool: `dist.mixed_precision=no`
            # means the word, whichever of them the Literal allows.
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in choices), value)
        if value in choices and not isinstance(value, bool):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"config key '{key}': unsupported schema type {tp!r}")
    raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")


def _fields(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    fields = _fields(obj)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{dotted}'; allowed here: {', '.join(sorted(fields))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(dotted, value, fields[key]))


def _set_dotted(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    _apply(cfg, nested)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003); values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 3e-4 as a string (it needs a dot); accept it as a number.
    if isinstance(value, str):
        try:
            value = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            pass
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then the dotted overrides, all type-checked."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (presets live in configs/)")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        try:
            _apply(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    checks = [
        (cfg.model.eigen_k >= 2, "model.eigen_k must be >= 2 (the first eigenvector is dropped)"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (cfg.model.n_classes >= 0,
         "model.n_classes must be >= 1 (the classes of labelled shards) or 0 (no labels: the cluster probe "
         "then has model.n_clusters segments)"),
        (cfg.model.n_clusters >= 2, "model.n_clusters (segments without labels) must be >= 2"),
        (cfg.model.extra_clusters >= 0, "model.extra_clusters must be >= 0"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (cfg.dist.zero_stage in (None, 1, 2), "dist.zero_stage must be 1, 2 or null (from the launcher)"),
        (cfg.dist.expected_world_size is None or cfg.dist.expected_world_size >= 1,
         "dist.expected_world_size must be >= 1 or null (trust the launcher)"),
        (cfg.dist.cpu_threads is None or cfg.dist.cpu_threads >= 1,
         "dist.cpu_threads must be >= 1 or null (cores / processes on this node)"),
        (cfg.eval.max_batches is None or cfg.eval.max_batches >= 1,
         "eval.max_batches must be >= 1 or null (the whole validation stream)"),
        (cfg.train.keep_last >= 1, "train.keep_last must be >= 1"),
    ]
    patch = patch_size(cfg.model.backbone)
    for key in ("resolution", "val_resolution"):
        side = getattr(cfg.data, key)
        # The patch embedding would silently drop the last side % patch pixels of every row and
        # column, and the upsampled predictions would no longer line up with the labels.
        checks.append((patch is None or side % patch == 0,
                       f"data.{key}={side} is not a multiple of the patch size {patch} of "
                       f"{cfg.model.backbone}; use {side // patch * patch or patch} or {(side // patch + 1) * patch}"
                       if patch else ""))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def patch_size(backbone: str) -> int | None:
    """The patch size spelled in a timm ViT name or an official DINOv2 stem (None if not spelled)."""
    m = re.search(r"patch(\d+)", backbone) or re.match(r"dinov2_vit[sblg](\d+)", backbone)
    return int(m.group(1)) if m else None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# Unset values were spelled 0 / "" before they became null; configs stored in checkpoints and
# run folders then are read with the new spelling.
_LEGACY_UNSET = {("dist", "zero_stage"): 0, ("dist", "expected_world_size"): 0, ("dist", "cpu_threads"): 0,
                 ("tracking", "uri"): "", ("eval", "max_batches"): 0}


def from_dict(data: dict) -> Config:
    """A validated Config from a stored (checkpoint / run folder) config dict."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, key), old in _LEGACY_UNSET.items():
        if isinstance(data.get(section), dict) and data[section].get(key) == old:
            data[section][key] = None
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_yaml(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def step_batches(step_unit: StepUnit, count: int) -> int:
    """Convert a step count written in `step_unit` (``train.step_unit``) into optimizer steps (batches)."""
    if step_unit == "pl_optimizer_calls":
        return max(1, count // 7)  # the official code steps 7 optimizers per batch
    return count
