"""Step-level parity: our whole training step against one recorded official training step.

Reads the folder named by ``$EAGLE_STEP_FIXTURES`` (default ``../shared/fixtures/official_step``;
format in its README) and the checkpoint its meta names in ``$EAGLE_OFFICIAL_CKPT_FIXTURES``
(default ``../shared/fixtures/official_ckpt``).  For every case (a global step) it loads the
checkpoint with the official-checkpoint reader, sets dropout to 0, runs the training step that
``Trainer.train_step`` runs (``engine.step.run_step`` with a one-process ``Dist``, the forward
``training_step_losses``, the optimizer of ``build_optimizer``, both prepared as the trainer does)
and compares every logged value, the total, every gradient and every parameter after the step.
Parameters: the README's 1e-6 applies to the part of the difference that the measured gradient
difference does not explain through Adam's first step (see the comment at that check).

Replay (the only randomness left with dropout 0), by monkeypatching for the duration of the step:

* ``torch.rand`` / ``torch.randperm``: the correspondence loss's draws, returned in call order
  (3 coordinate sets, then one permutation per negative, as the official code draws them);
* ``eigen_vectors`` of the EiCue module: the recorded eigenvectors, in call order (view P, then
  the augmented view).  The fixture holds them after the sign rule, as ``eigen_vectors`` returns.

Every call is checked against the recording (shapes, counts), so a step that stops drawing or
solving where the official one does fails here instead of passing vacuously.

    .venv/bin/python -m pytest tests/parity/test_step_parity.py -rA
    EAGLE_STEP_REPORT=/tmp/step.jsonl .venv/bin/python -m pytest tests/parity/test_step_parity.py
        # also writes the largest error of every quantity and case (with its tolerance) as JSON lines
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import helpers
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


STEP_DIR = helpers.fixture_dir("EAGLE_STEP_FIXTURES", "official_step")
CKPT_DIR = helpers.fixture_dir("EAGLE_OFFICIAL_CKPT_FIXTURES", "official_ckpt")
EXPECTED = sorted(STEP_DIR.glob("*.npz"))

# The fixture README's tolerances.
LOSS_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-9  # relative to the tensor's largest entry
PARAM_ATOL = 1e-6

# Official logged name -> key of our step's output.  Before the u switch the official step
# computes the two InfoNCE directions and multiplies them by 0; ours skips them (the same
# update) and reports 0, so they are compared in the u > 0 case only; the total covers both.
LOGGED = {
    "loss/pos_inter": "loss_pos_inter",
    "loss/neg_inter": "loss_neg_inter",
    "loss/local_pos_loss": "loss_nce_p",
    "loss/local_pos_aug_loss": "loss_nce_a",
    "loss/cluster_eigen_loss": "loss_eigen_p",
    "cd/pos_inter": "cd_pos_inter",
    "cd/neg_inter": "cd_neg_inter",
    "cd/update_params": "u",
    "loss/linear": "loss_linear",
    "loss/cluster": "loss_cluster",
    "loss/total": "loss",
}
NCE_KEYS = {"loss_nce_p", "loss_nce_a"}


def _checkpoint(meta: dict, tmp_dir: Path) -> Path:
    name = meta["weights"]
    plain_name = name[:-3] if name.endswith(".gz") else name
    if (CKPT_DIR / plain_name).is_file():
        return CKPT_DIR / plain_name
    packed = CKPT_DIR / (name if name.endswith(".gz") else name + ".gz")
    assert packed.is_file(), f"the step fixture names {name}, which is not in {CKPT_DIR}"
    target = tmp_dir / plain_name
    if not target.is_file():
        with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


class Replay:
    """Hands out recorded values in call order; every call is checked against the recording."""

    def __init__(self, name: str, values: list[torch.Tensor]):
        self.name, self.values, self.calls = name, values, 0

    def next(self, shape: tuple[int, ...]) -> torch.Tensor:
        assert self.calls < len(self.values), (
            f"our step made more {self.name} calls than the recorded {len(self.values)}")
        value = self.values[self.calls]
        assert tuple(value.shape) == tuple(shape), (
            f"{self.name} call {self.calls}: our step asks for {tuple(shape)}, "
            f"the official one drew {tuple(value.shape)}")
        self.calls += 1
        return value.clone()

    def check_used(self) -> None:
        assert self.calls == len(self.values), (
            f"our step made {self.calls} {self.name} calls, the official one {len(self.values)}")


class _OncePerInput(torch.nn.Module):
    """The frozen backbone, run once per distinct image batch: its keys are the same in every
    case (same weights, same pixels), so the second case reuses them (CPU time in CI)."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("backbone"), name)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        for seen_img, keys in self.seen:
            if seen_img.shape == img.shape and torch.equal(seen_img, img):
                return keys
        keys = self.backbone(img)
        self.seen.append((img.clone(), keys))
        return keys


def _shape(size) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    return tuple(int(s) for s in size)


def _compare_rows(rows, case, quantity, ours, ref, atol, rtol_of_max=0.0, slack=None):
    """One report row: the largest error against ``atol + rtol_of_max * max|ref|`` (plus a
    per-entry ``slack`` that is explained elsewhere; the row then also gives the error beyond it)."""
    ours = np.atleast_1d(np.asarray(ours, dtype=np.float64))
    ref = np.atleast_1d(np.asarray(ref, dtype=np.float64))
    assert ours.shape == ref.shape, f"{case} {quantity}: shape {ours.shape} vs recorded {ref.shape}"
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    allowed = atol + rtol_of_max * scale
    diff = np.abs(ours - ref)
    beyond = diff - (slack if slack is not None else 0.0)
    row = {"case": case, "quantity": quantity, "max_abs_err": float(diff.max(initial=0.0)),
           "rel_to_max": float(diff.max(initial=0.0)) / scale if scale else None, "allowed": allowed,
           "ok": bool(np.isfinite(ours).all() and (beyond <= allowed).all())}
    if slack is not None:
        row["max_err_beyond_adam_propagation"] = float(beyond.max(initial=0.0))
    rows.append(row)


@pytest.mark.parametrize("npz", EXPECTED, ids=[p.stem for p in EXPECTED])
def test_training_step_matches_the_official_step(npz, tmp_path, monkeypatch):
    from eagle_dist import distributed
    from eagle_dist.method import eagle
    from eagle_dist.method.official import load_official_checkpoint

    with np.load(npz, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"]))
    official = load_official_checkpoint(_checkpoint(meta, tmp_path))
    base = official.cfg
    # The step's settings come from the checkpoint; the recording states the ones it relied on.
    for key, ours in (("step_schedulers", base.loss.step_schedulers), ("momentum_limit", base.loss.momentum_limit),
                      ("neg_samples", base.loss.neg_samples), ("feature_samples", base.loss.feature_samples)):
        assert ours == pytest.approx(meta[key]), f"config {key}={ours} but the recording used {meta[key]}"
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, dropout=float(meta["dropout_p"])),
        dist=dataclasses.replace(base.dist, mixed_precision="no"),
    )
    batch = {
        "img": torch.from_numpy(data["in__img"]),
        "img_aug": torch.from_numpy(data["in__img_pos_aug"]),
        "label": torch.from_numpy(data["in__label"].astype(np.int64)),
    }
    assert tuple(batch["img"].shape[-2:]) == tuple(meta["size"]) and batch["img"].shape[0] == meta["batch"]

    backbone, _ = eagle.build_model(cfg, "cpu", official=official)
    features = _OncePerInput(backbone)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # one process, whatever launched pytest
    threads = torch.get_num_threads()
    d = distributed.setup(strategy="ddp", mixed_precision=cfg.dist.mixed_precision, grad_clip=cfg.optim.grad_clip,
                          seed=cfg.train.seed, cpu_threads=threads)
    report: list[dict] = []
    try:
        for case, info in meta["cases"].items():
            _run_case(case, info, data, meta, official, cfg, d, features, batch, monkeypatch, report)
    finally:
        d.cleanup()
        torch.set_num_threads(threads)
    target = os.environ.get("EAGLE_STEP_REPORT")
    if target:
        with open(target, "a") as f:
            for row in report:
                f.write(json.dumps(dict(row, fixture=npz.name)) + "\n")
    failures = [row for row in report if not row["ok"]]
    assert not failures, "step parity outside the README tolerances:\n" + "\n".join(json.dumps(r) for r in failures)


def _run_case(case, info, data, meta, official, cfg, d, features, batch, monkeypatch, report) -> None:
    """One recorded case through the trainer's step (`run_step`); appends its comparisons to `report`."""
    from eagle_dist.engine.step import run_step
    from eagle_dist.method import eagle, eicue
    from eagle_dist.method.official import official_to_ours

    # As Trainer._build_model: heads holding the checkpoint's weights, one optimizer over the
    # named parameter groups, both prepared by the Dist.  Every case starts afresh.
    heads = eagle.EagleHeads(cfg.model, cfg.eicue, cfg.loss, features.out_channels)
    official.load_into(features.backbone, heads)
    optimizer = eagle.build_optimizer(heads, cfg.optim, cfg.optim.reference_global_batch)
    model, optimizer = d.prepare(heads, optimizer)
    model.train()

    draws_rand = Replay("torch.rand",
                        [torch.from_numpy(data[f"{case}__draw_rand_{i}"]) for i in range(info["n_rand"])])
    draws_perm = Replay("torch.randperm",
                        [torch.from_numpy(data[f"{case}__draw_randperm_{i}"]) for i in range(info["n_randperm"])])
    eigvecs = Replay("eigen_vectors",
                     [torch.from_numpy(data[f"{case}__eigvecs_{i}"]) for i in range(info["n_eig_calls"])])

    def fake_rand(*size, generator=None, device=None, dtype=None, **_):
        return draws_rand.next(_shape(size)).to(device=device or "cpu", dtype=dtype or torch.float32)

    def fake_randperm(n, generator=None, device=None, dtype=None, **_):
        return draws_perm.next((int(n),)).to(device=device or "cpu", dtype=dtype or torch.int64)

    def fake_eigen_vectors(img, code_BND, n_side, k, *args, **kwargs):
        return eigvecs.next((code_BND.shape[0], code_BND.shape[1], k)).to(code_BND.device)

    # run_step zeroes the gradients after the optimizer step: record them on the way in.
    grads_seen: dict[str, torch.Tensor] = {}
    fresh: list[bool] = []
    real_step = optimizer.step

    def recording_step(*args, **kwargs):
        fresh.append(not getattr(optimizer, "optimizer", optimizer).state)
        grads_seen.update({n: p.grad.detach().clone() for n, p in heads.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    def forward(batch_, step_):  # what Trainer._forward passes to run_step
        u = eagle.momentum(cfg.loss, step_, cfg.train.step_unit)
        return eagle.training_step_losses(features, model, batch_, u, precision=d.precision)

    with monkeypatch.context() as m:
        m.setattr(torch, "rand", fake_rand)
        m.setattr(torch, "randperm", fake_randperm)
        m.setattr(eicue, "eigen_vectors", fake_eigen_vectors)
        m.setattr(optimizer, "step", recording_step)
        result = run_step(d, model, optimizer, forward, batch, step=info["global_step"],
                          metric_names=eagle.LOSS_NAMES, grad_clip=cfg.optim.grad_clip)
    for replay in (draws_rand, draws_perm, eigvecs):
        replay.check_used()
    assert result.updated and fresh == [True], "the step must update once, from a fresh optimizer as recorded"
    out = result.metrics  # what the trainer logs (averaged over the one rank)

    assert out["u"] == pytest.approx(info["u"])
    for name, value in info["logged"].items():
        assert name in LOGGED, f"the official step logs {name}, which this test does not map"
        key = LOGGED[name]
        if key in NCE_KEYS and info["u"] == 0:
            continue  # skipped before the switch (see LOGGED); the u > 0 case compares them
        _compare_rows(report, case, name, out[key], value, LOSS_ATOL)
    _compare_rows(report, case, "total (returned)", out["loss"], info["total"], LOSS_ATOL)

    params = dict(heads.named_parameters())
    mapped = {}
    for name in info["grad_params"]:
        target = official_to_ours(name)
        assert target is not None and target[0] == "heads", f"official trainable {name} has no eagle-dist parameter"
        mapped[name] = target[1]
    assert set(mapped.values()) == set(params), (
        f"trainable parameters differ: ours only {sorted(set(params) - set(mapped.values()))}, "
        f"official only {sorted(n for n, k in mapped.items() if k not in params)}")
    no_grad = sorted(name for name, ours in mapped.items() if ours not in grads_seen)
    assert not no_grad, f"our step leaves no gradient on {no_grad}; the official step trains them"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    subsample = meta["subsample"]
    stride = int(subsample["stride"])
    for name, ours in mapped.items():
        param = params[ours]
        stored = {}
        for kind in ("grad", "after"):
            key = f"{case}__{kind}__{name}"
            sub = f"{key}__s{stride}" in data
            assert sub or key in data, f"no recording of {kind} {name}"
            assert sub == (param.numel() > subsample["threshold"]), f"{key}: unexpected subsampling"
            stored[kind] = data[f"{key}__s{stride}" if sub else key].astype(np.float64)
        pick = slice(None, None, stride) if param.numel() > subsample["threshold"] else slice(None)
        grad = grads_seen[ours].reshape(-1).double().numpy()[pick]
        after = param.detach().reshape(-1).double().numpy()[pick]
        _compare_rows(report, case, f"grad {name}", grad, stored["grad"], GRAD_ATOL, GRAD_RTOL)
        # Adam's first step moves a weight by lr * g / (|g| + eps): where |g| is near eps
        # (~1e-8) a gradient difference far inside the gradient tolerance (1e-10 out of
        # 4e-10) changes the move by up to lr.  The parameter tolerance is therefore applied
        # to what remains after that propagated difference, measured entry by entry.
        group = group_of[id(param)]
        lr, eps = group["lr"], group["eps"]
        explained = lr * np.abs(grad / (np.abs(grad) + eps) - stored["grad"] / (np.abs(stored["grad"]) + eps))
        _compare_rows(report, case, f"after {name}", after, stored["after"], PARAM_ATOL, slack=explained)
