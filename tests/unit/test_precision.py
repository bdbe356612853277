"""Mixed precision is decided once (`distributed.resolve_precision`, kept on `Dist.precision`)
and the training step runs what setup() logs: bf16 asked for on a CPU is honoured and logged."""

import re
import warnings

import pytest
import torch
from torch import nn

from eagle_dist import distributed as dist_mod
from eagle_dist.config import ConfigError, load_config
from eagle_dist.distributed import DistributedSetupError, Precision, resolve_precision
from eagle_dist.method import eicue
from eagle_dist.method.eagle import EagleHeads, momentum, training_step_losses

# A step small enough for bf16 on a CPU (emulated there): 4x4 tokens, narrow heads.
SMALL = ["model.dim=16", "model.n_classes=3", "model.extra_clusters=1", "model.eigen_clusters=3",
         "loss.feature_samples=3", "loss.neg_samples=1", "data.batch_size=2"]


class PatchKeys(nn.Module):
    """A stand-in for the frozen ViT: one strided conv, so it runs (and casts) under autocast
    like the ViT's linear layers do, at a fraction of the cost."""

    out_channels = 24

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, self.out_channels, kernel_size=8, stride=8)

    @torch.no_grad()
    def forward(self, img):
        return self.proj(img)


def _batch(device="cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    return {"img": torch.randn(2, 3, 32, 32, generator=g).to(device),
            "img_aug": torch.randn(2, 3, 32, 32, generator=g).to(device),
            "label": torch.randint(-1, 3, (2, 32, 32), generator=g).to(device)}


def _step_dtypes(precision: Precision, solver: str, monkeypatch, batch: dict | None = None) -> dict:
    """Run one real training step under `precision`; record what ran in which dtype and where."""
    cfg = load_config(None, [*SMALL, f"eicue.solver={solver}"])
    batch = _batch() if batch is None else batch
    device = batch["img"].device
    torch.manual_seed(0)
    backbone, heads = PatchKeys().to(device), EagleHeads(cfg.model, cfg.eicue, cfg.loss, PatchKeys.out_channels).to(device)
    seen: dict = {"solver_calls": []}
    def dtype_of(name):
        def hook(module, inputs, out):
            out = out[0] if isinstance(out, tuple) else out  # the seg head's three training views
            seen.setdefault(name, out.dtype)  # returns None: the output is left as it is
        return hook

    heads.seg_head.register_forward_hook(dtype_of("seg_head"))
    backbone.register_forward_hook(dtype_of("backbone"))
    original = eicue.smallest_eigenpairs

    def solver_spy(lap_BNN, k, solver="eigh"):
        vals, vecs = original(lap_BNN, k, solver)
        seen["solver_calls"].append((solver, lap_BNN.dtype, torch.is_autocast_enabled(lap_BNN.device.type),
                                     vecs.dtype))
        seen["solver_device"] = vecs.device
        return vals, vecs

    monkeypatch.setattr(eicue, "smallest_eigenpairs", solver_spy)
    out = training_step_losses(backbone, heads, batch, momentum(cfg.loss, 1000), precision=precision)  # NCE on
    out["loss"].backward()
    seen["loss_finite"] = bool(torch.isfinite(out["loss"]))
    seen["loss_device"] = out["loss"].device
    seen["grads_fp32"] = all(p.grad is None or p.grad.dtype == torch.float32 for p in heads.parameters())
    return seen


def test_resolution_table():
    assert resolve_precision("auto", "cpu") == Precision("cpu", torch.float32, False)
    assert resolve_precision("no", "cpu") == Precision("cpu", torch.float32, False)
    assert resolve_precision("bf16", "cpu") == Precision("cpu", torch.bfloat16, True)
    assert resolve_precision("bf16", torch.device("cuda")) == Precision("cuda", torch.bfloat16, True)
    assert resolve_precision("no", "cuda").mode == "no" and resolve_precision("bf16", "cpu").mode == "bf16"
    with pytest.raises(DistributedSetupError, match="loss scaling"):
        resolve_precision("fp16", "cpu")


def test_no_on_the_command_line_and_in_yaml_is_the_word_not_a_bool(tmp_path):
    assert load_config(None, ["dist.mixed_precision=no"]).dist.mixed_precision == "no"
    (tmp_path / "run.yaml").write_text("dist:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "run.yaml", []).dist.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["dist.mixed_precision=yes"])  # not an allowed word


@pytest.mark.parametrize("native, mode", [(True, "bf16"), (False, "no")])
def test_auto_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch, native, mode):
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_precision("auto", "cuda").mode == mode
    assert calls == [False]  # an emulated bf16 (pre-Ampere) is not what "auto" should pick


def test_off_does_not_switch_off_a_callers_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with resolve_precision("no", "cpu").context():
            assert torch.is_autocast_enabled("cpu")
    with resolve_precision("bf16", "cpu").context():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.fixture
def cpu_env(clean_env):
    """conftest's clean_env, and the CPU case even on a GPU machine."""
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    return clean_env


@pytest.mark.parametrize("requested", ["auto", "no", "bf16"])
def test_what_setup_logs_is_what_the_step_runs(cpu_env, requested):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = dist_mod.setup(mixed_precision=requested, cpu_threads=1)
    try:
        logged = re.search(r"mixed_precision=(\w+)", dist_mod.describe(d)).group(1)
        # Autocast is the one mechanism: accelerate must not wrap the forward or cast weights.
        assert d.accelerator.mixed_precision == "no"
        seen = _step_dtypes(d.precision, "eigh", cpu_env)
    finally:
        d.cleanup()
    ran = {"bf16": torch.bfloat16, "no": torch.float32}[logged]
    assert seen["backbone"] == ran and seen["seg_head"] == ran
    assert logged == d.mixed_precision == ("bf16" if requested == "bf16" else "no")  # CPU bf16 is honoured
    assert not [w for w in caught if "precision" in str(w.message) or "bf16" in str(w.message)]
    assert seen["loss_finite"] and seen["grads_fp32"]


@pytest.mark.parametrize("solver", ["eigh", "krylov"])
def test_eigensolvers_run_in_fp32_inside_the_bf16_step(monkeypatch, solver):
    seen = _step_dtypes(resolve_precision("bf16", "cpu"), solver, monkeypatch)
    assert seen["seg_head"] == torch.bfloat16  # the step did run under bf16 autocast
    # Both views' graphs: fp32 in, autocast off inside the solver, fp32 out.
    assert seen["solver_calls"] == [(solver, torch.float32, False, torch.float32)] * 2
    assert seen["loss_finite"] and seen["grads_fp32"]


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["eigh", "krylov"])
def test_on_a_gpu_auto_is_bf16_and_a_pinned_batch_steps_on_the_device(monkeypatch, solver):
    from eagle_dist.distributed import Dist

    precision = resolve_precision("auto", "cuda")
    assert precision.mode == "bf16", "auto picked fp32: this GPU has no native bf16 (pre-Ampere)"
    d = Dist(accelerator=None, rank=0, world_size=1, local_rank=0, local_world_size=1,
             device=torch.device("cuda", torch.cuda.current_device()), backend=None, strategy="ddp",
             zero_stage=None, precision=precision, grad_clip=1.0, launcher="none", cpu_threads=1)
    pinned = {k: v.pin_memory() for k, v in _batch().items()}  # what a pin_memory loader yields
    batch = d.to_device({**pinned, "key": ["not a tensor"]})
    assert set(batch) == {"img", "img_aug", "label"} and all(v.is_cuda for v in batch.values())
    seen = _step_dtypes(precision, solver, monkeypatch, batch)
    assert seen["backbone"] == seen["seg_head"] == torch.bfloat16
    assert seen["solver_calls"] == [(solver, torch.float32, False, torch.float32)] * 2
    assert seen["solver_device"].type == seen["loss_device"].type == "cuda"
    assert seen["loss_finite"] and seen["grads_fp32"]
