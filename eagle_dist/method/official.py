"""Official EAGLE checkpoints: read them without executing anything, map them onto eagle-dist.

The official code (MICV-yonsei/EAGLE) saves PyTorch Lightning ``.ckpt`` files of its
``LitUnsupervisedSegmenter``: the released COCO-Stuff ViT-S/8 and Cityscapes ViT-B/8 models and
every checkpoint trained with that code.

    from eagle_dist.method.official import load_official_checkpoint
    official = load_official_checkpoint("eagle_cocostuff27_vit_small8.ckpt")
    official.cfg                      # the matching eagle-dist Config (from hyper_parameters)
    backbone, heads = build_model(official.cfg, official=official)  # eagle_dist.method.eagle
    official.skipped                  # official keys eagle-dist has no use for

Everywhere a checkpoint is accepted (evaluate, predict, visualize, ``model.init_from``) a
``.ckpt`` file goes through this module; ``python -m eagle_dist.convert X.ckpt OUT`` writes an
eagle-dist checkpoint folder once, so that later loads need no unpickling at all.

Safety.  A ``.ckpt`` is a zip archive (``<name>/data.pkl`` plus one ``<name>/data/<key>`` record
per tensor storage) whose pickle also holds OmegaConf objects (``hyper_parameters["cfg"]``),
which ``torch.load(weights_only=True)`` refuses and ``weights_only=False`` would build by running
whatever the file names.  :class:`_RestrictedUnpickler` runs nothing from the file: the only
globals that resolve to real code are ``collections.OrderedDict`` and the two tensor-rebuild
functions, which this module implements itself over the raw storage bytes; every other global
(OmegaConf classes, ``typing.Any``, or a hostile ``os.system``) becomes an inert record of how
the file wanted it built, and OmegaConf records are then turned into plain dicts and lists.

Mapping (official name -> eagle-dist):

    net.model.*                          -> the timm ViT (DINO names load strictly into timm)
    net.cluster1.*, net.cluster2.*       -> heads.seg_head.cluster1.*, .cluster2.*
    project_head.*                       -> heads.projection.linear.*
    cluster_probe.clusters               -> heads.cluster_probe.clusters
    linear_probe.{weight,bias}           -> heads.linear_probe.{weight,bias}
    train_cluster_probe_eigen.clusters   -> heads.eigen_probe.clusters
    train_cluster_probe_eigen_aug.clusters -> heads.eigen_probe_aug.clusters
    decoder.*, train_cluster_probe.*, CELoss.*   skipped (dead in the official model)
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eagle_dist import config as config_mod
from eagle_dist.checkpoint import CheckpointError
from eagle_dist.config import Config
from eagle_dist.errors import key_list

__all__ = [
    "OfficialCheckpointError",
    "OfficialCheckpoint",
    "is_official_checkpoint",
    "load_official_checkpoint",
    "official_to_ours",
    "read_checkpoint_file",
]


class OfficialCheckpointError(CheckpointError):
    """An official checkpoint that cannot be read or does not fit; the message names the problem."""


BACKBONE_PREFIX = "net.model."
# Official prefix -> EagleHeads state-dict prefix.  The eigen "_aug" probe must be tried before
# its shorter namesake.
HEAD_PREFIXES = (
    ("net.cluster1.", "seg_head.cluster1."),
    ("net.cluster2.", "seg_head.cluster2."),
    ("project_head.", "projection.linear."),
    ("cluster_probe.", "cluster_probe."),
    ("linear_probe.", "linear_probe."),
    ("train_cluster_probe_eigen_aug.", "eigen_probe_aug."),
    ("train_cluster_probe_eigen.", "eigen_probe."),
)
# Parts of the official model that train nothing eagle-dist uses (ALGORITHM.md quirk 14): the
# decoder, the probe on the token-feature branch, and the dead learned centroids.
UNUSED_PREFIXES = ("decoder.", "train_cluster_probe.", "CELoss.")


def official_to_ours(name: str) -> tuple[str, str] | None:
    """``("backbone" | "heads", our key)`` for an official state-dict key, None if unused/unknown."""
    if name.startswith(BACKBONE_PREFIX):
        return "backbone", name[len(BACKBONE_PREFIX):]
    for official, ours in HEAD_PREFIXES:
        if name.startswith(official):
            return "heads", ours + name[len(official):]
    return None


def _ours_to_official(part: str, key: str) -> str:
    if part.startswith("backbone"):
        return BACKBONE_PREFIX + key
    for official, ours in HEAD_PREFIXES:
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


# ----------------------------------------------------------------------------- restricted unpickling


class _Inert:
    """What a global the reader does not trust becomes: a record, never a call into the file's code.

    Pickle builds it through the class (REDUCE / NEWOBJ / INST) and fills it (BUILD, SETITEMS,
    APPENDS); each of these only stores its arguments.
    """

    global_name = "?"
    args: tuple
    kwargs: dict
    state: Any
    items: list

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch's ``_rebuild_tensor_v2``, over a storage this module read itself (a flat tensor)."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"a tensor refers to a storage of type {type(storage).__name__}")
    try:
        return storage.as_strided(tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as err:
        raise pickle.UnpicklingError(f"a tensor does not fit its storage ({err})") from None


def _rebuild_parameter(data, requires_grad=False, hooks=None, *rest):
    return data


_TRUSTED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip archive; storages come from ``read_record(key)``."""

    def __init__(self, data: bytes, read_record):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._storages: dict[str, torch.Tensor] = {}
        self._inert_classes: dict[str, type] = {}
        self.untrusted: set[str] = set()

    def find_class(self, module: str, name: str):
        trusted = _TRUSTED.get((module, name))
        if trusted is not None:
            return trusted
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        qualified = f"{module}.{name}"
        if not module.startswith("omegaconf"):
            self.untrusted.add(qualified)
        cls = self._inert_classes.get(qualified)
        if cls is None:
            cls = type("Inert", (_Inert,), {"global_name": qualified})
            self._inert_classes[qualified] = cls
        return cls

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            dtype = storage_type.dtype
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != int(numel) * itemsize and dtype != torch.uint8:
                raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, expected {numel} x {itemsize}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self._storages[key] = flat
        return self._storages[key]


def read_checkpoint_file(path: str | Path) -> tuple[Any, set[str]]:
    """The object pickled in a torch zip archive, with tensors materialised and nothing executed.

    Returns ``(object, untrusted globals met)``.  Raises OfficialCheckpointError for a file that is
    not a torch zip archive or whose pickle is broken.
    """
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"checkpoint file not found: {path}")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise OfficialCheckpointError(
            f"{path} is not a PyTorch checkpoint ({err}); pass the .ckpt file the official EAGLE code "
            "saved (a gzipped file must be decompressed first)"
        ) from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise OfficialCheckpointError(
                f"{path} is a zip file but not a PyTorch checkpoint (no <name>/data.pkl record)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").decode().strip() != sys.byteorder:
            raise OfficialCheckpointError(f"{path} was written on a machine of the other byte order; "
                                          "re-save it with torch.save on this kind of machine")

        def read_record(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise pickle.UnpicklingError(f"the archive has no record {name}")
            return archive.read(name)

        unpickler = _RestrictedUnpickler(archive.read(pickles[0]), read_record)
        try:
            obj = unpickler.load()
        except Exception as err:  # noqa: BLE001  (any failure inside a foreign pickle is "unreadable")
            raise OfficialCheckpointError(
                f"{path} could not be read as a checkpoint: {type(err).__name__}: {err}") from None
    return obj, unpickler.untrusted


def plain(obj: Any) -> Any:
    """OmegaConf records -> dicts / lists / values; other inert records -> their global's name."""
    if isinstance(obj, _Inert):
        state = obj.state
        if obj.global_name.startswith("omegaconf.") and isinstance(state, dict):
            if "_content" in state:
                return plain(state["_content"])
            if "_val" in state:
                return plain(state["_val"])
        return f"<{obj.global_name}>"
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- configuration


# Official config key -> eagle-dist key.  Every method setting of the official configs that has
# an eagle-dist key is here; the rest (logging, paths, dead options) has no effect on the model.
_CONFIG_KEYS = {
    "dim": "model.dim",
    "extra_clusters": "model.extra_clusters",
    "eigen_cluster": "model.eigen_k",
    "eigen_cluster_out": "model.eigen_clusters",
    "contrastive_temp": "loss.contrastive_temp",
    "global_loss_weight": "loss.global_loss_weight",
    "local_pos_weight": "loss.local_pos_weight",
    "local_pos_aug_weight": "loss.local_pos_aug_weight",
    "centroid_mode": "loss.centroid_mode",
    "feature_samples": "loss.feature_samples",
    "neg_samples": "loss.neg_samples",
    "pos_inter_weight": "loss.pos_inter_weight",
    "neg_inter_weight": "loss.neg_inter_weight",
    "shift_value": "loss.shift_value",
    "shift_bias": "loss.shift_bias",
    "pointwise": "loss.pointwise",
    "zero_clamp": "loss.zero_clamp",
    "stabalize": "loss.stabalize",
    "correspondence_weight": "loss.correspondence_weight",
    "step_schedulers": "loss.step_schedulers",
    "momentum_limit": "loss.momentum_limit",
    "lr": "optim.lr",
    "lr_linear": "optim.lr_linear",
    "lr_cluster": "optim.lr_cluster",
    "lr_cluster_eigen": "optim.lr_eigen",
    "res": "data.resolution",
    "batch_size": "data.batch_size",
    "num_workers": "data.num_workers",
    "max_steps": "train.max_steps",
}
# The official dataset names and eagle-dist's.
_DATASETS = {"cocostuff27": "cocostuff27", "cityscapes": "cityscapes27", "potsdam": "potsdam3", "potsdam3": "potsdam3"}
# Official Dropout2d probability when `dropout: true`.
_OFFICIAL_DROPOUT = 0.1


def _set(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def config_from_hyper_parameters(hp: dict, source: str = "the checkpoint") -> Config:
    """The eagle-dist config of an official run (``hyper_parameters`` as plain data)."""
    cfg = hp.get("cfg") if isinstance(hp, dict) else None
    if not isinstance(cfg, dict):
        raise OfficialCheckpointError(f"{source} has no hyper_parameters['cfg'] mapping: not an official EAGLE "
                                      "checkpoint (LitUnsupervisedSegmenter saves its config there)")
    missing = [k for k in ("model_type", "dino_patch_size") if k not in cfg]
    if missing:
        raise OfficialCheckpointError(f"{source}: hyper_parameters['cfg'] lacks {', '.join(missing)}; the backbone "
                                      "cannot be chosen")
    data: dict = {}
    official_name = str(cfg.get("dataset_name", "cocostuff27"))
    dataset = _DATASETS.get(official_name, official_name)
    data["dataset"] = dataset
    _set(data, "model.backbone", f"{cfg['model_type']}_patch{int(cfg['dino_patch_size'])}_224")
    n_classes = hp.get("n_classes", cfg.get("n_classes"))
    if n_classes is not None:
        _set(data, "model.n_classes", int(n_classes))
    if "dropout" in cfg:
        _set(data, "model.dropout", _OFFICIAL_DROPOUT if cfg["dropout"] else 0.0)
    for official, ours in _CONFIG_KEYS.items():
        if official in cfg and cfg[official] is not None:
            _set(data, ours, cfg[official])
    if "lr" in cfg:
        _set(data, "optim.lr_proj", cfg["lr"])  # the official projection head trains at cfg.lr
    if "batch_size" in cfg:
        _set(data, "data.val_batch_size", max(1, int(cfg["batch_size"]) // 2))  # official: batch_size / 2
    # Quirk 12: the official code picks its Cityscapes loss branch by this exact string.
    _set(data, "loss.nce_variant", "cityscapes" if official_name == "cityscapes" else "per_pixel")
    _set(data, "data.train_shards", f"shards/{dataset}/train")
    _set(data, "data.val_shards", f"shards/{dataset}/val")
    _set(data, "train.run_name", dataset)
    # YAML-style numbers (5e-05 written as a string by some OmegaConf versions) go through the
    # same parsing as command-line overrides.
    for section in list(data):
        if isinstance(data[section], dict):
            for key, value in data[section].items():
                if isinstance(value, str) and key not in ("backbone", "centroid_mode", "train_shards",
                                                          "val_shards", "run_name"):
                    data[section][key] = config_mod.parse_override(f"x={value}")[1]
    try:
        return config_mod.from_dict(data)
    except config_mod.ConfigError as err:
        raise OfficialCheckpointError(f"{source}: its configuration has no eagle-dist equivalent ({err})") from None


# ----------------------------------------------------------------------------- the checkpoint


@dataclass
class OfficialCheckpoint:
    """An official checkpoint mapped onto eagle-dist (weights not yet in modules)."""

    path: Path
    cfg: Config
    backbone_state: dict[str, torch.Tensor]  # timm ViT key -> tensor
    heads_state: dict[str, torch.Tensor]  # EagleHeads key -> tensor
    skipped: list[str] = field(default_factory=list)  # official keys eagle-dist does not use
    unknown: list[str] = field(default_factory=list)  # keys of no known official module (skipped too)
    hyper_parameters: dict = field(default_factory=dict)
    global_step: int = 0
    epoch: int = 0
    lightning_version: str = ""

    def load_into(self, backbone, heads=None) -> None:
        """Copy the weights into existing modules (checked first; nothing is copied on a mismatch).

        Without ``heads`` only the backbone is loaded (a run started with ``model.init_from``
        takes its heads from its own checkpoints)."""
        vit = backbone.vit if hasattr(backbone, "vit") else backbone
        problems = _compare(f"backbone {self.cfg.model.backbone}", vit.state_dict(), self.backbone_state)
        if heads is not None:
            problems += _compare("heads", heads.state_dict(), self.heads_state)
        if problems:
            raise OfficialCheckpointError(
                f"{self.path} does not fit the eagle-dist model of its configuration "
                f"(backbone {self.cfg.model.backbone}, dim {self.cfg.model.dim}, {self.cfg.model.n_classes} "
                f"classes + {self.cfg.model.extra_clusters} extra clusters): " + "; ".join(problems)
                + ". Is it an official EAGLE checkpoint whose hyper_parameters match its weights?"
            )
        vit.load_state_dict(self.backbone_state, strict=True)
        if heads is not None:
            heads.load_state_dict(self.heads_state, strict=True)


def _compare(part: str, own: dict, theirs: dict) -> list[str]:
    missing = sorted(_ours_to_official(part, k) for k in set(own) - set(theirs))
    mismatched = sorted(
        f"{_ours_to_official(part, k)} {list(theirs[k].shape)} (model: {list(own[k].shape)})"
        for k in set(own) & set(theirs) if tuple(own[k].shape) != tuple(theirs[k].shape)
    )
    extra = sorted(_ours_to_official(part, k) for k in set(theirs) - set(own))
    problems = []
    if missing:
        problems.append(f"{part}: missing keys: {key_list(missing)}")
    if mismatched:
        problems.append(f"{part}: mis-shaped keys: {key_list(mismatched)}")
    if extra:
        problems.append(f"{part}: keys the model does not have: {key_list(extra)}")
    return problems


def is_official_checkpoint(path: str | Path) -> bool:
    """A file (not an eagle-dist checkpoint folder) that is a zip archive: an official ``.ckpt``."""
    path = Path(path)
    return path.is_file() and zipfile.is_zipfile(path)


def load_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Read an official ``.ckpt`` and map its weights and configuration onto eagle-dist."""
    path = Path(path)
    obj, _untrusted = read_checkpoint_file(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise OfficialCheckpointError(f"{path} holds no 'state_dict': not a PyTorch Lightning checkpoint")
    hp = plain(obj.get("hyper_parameters"))
    cfg = config_from_hyper_parameters(hp if isinstance(hp, dict) else {}, str(path))
    backbone_state: dict[str, torch.Tensor] = {}
    heads_state: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    not_tensors: list[str] = []
    for name, value in obj["state_dict"].items():
        name = str(name)
        target = official_to_ours(name)
        if target is None:
            (skipped if name.startswith(UNUSED_PREFIXES) else unknown).append(name)
            continue
        if not isinstance(value, torch.Tensor):
            not_tensors.append(name)
            continue
        (backbone_state if target[0] == "backbone" else heads_state)[target[1]] = value
    if not_tensors:
        raise OfficialCheckpointError(f"{path}: state_dict entries that are not tensors: {key_list(sorted(not_tensors))}")
    if unknown:
        warnings.warn(f"{path}: skipping state_dict keys of no known official module: {key_list(sorted(unknown))}",
                      stacklevel=2)

    def number(key, default=0):
        value = obj.get(key, default)
        return int(value) if isinstance(value, int) else default

    return OfficialCheckpoint(
        path=path, cfg=cfg, backbone_state=backbone_state, heads_state=heads_state,
        skipped=sorted(skipped), unknown=sorted(unknown), hyper_parameters=hp if isinstance(hp, dict) else {},
        global_step=number("global_step"), epoch=number("epoch"),
        lightning_version=str(obj.get("pytorch-lightning_version", "")),
    )
