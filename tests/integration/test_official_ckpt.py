"""Official EAGLE checkpoints: safe reading, mapping onto eagle-dist, and inference parity.

Reads the folder named by ``$EAGLE_OFFICIAL_CKPT_FIXTURES`` (default ``../shared/fixtures/official_ckpt``
next to the repository; format in its README): every ``*.npz`` there records the official model's
outputs for the checkpoint its ``meta["ckpt"]`` names (stored as ``.ckpt`` or ``.ckpt.gz``), at every
input size of ``meta["sizes"]``.  The model is loaded through ``eagle_dist.evaluation.inference.load_model``, the
loader evaluate, predict and visualize share.

    .venv/bin/python -m pytest tests/integration/test_official_ckpt.py -rA
    EAGLE_OFFICIAL_CKPT_REPORT=/tmp/official.jsonl .venv/bin/python -m pytest tests/integration/test_official_ckpt.py -k parity
        # also writes the largest error of every output and size (with its tolerance) as JSON lines
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import helpers
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]


FIXTURE_DIR = helpers.fixture_dir("EAGLE_OFFICIAL_CKPT_FIXTURES", "official_ckpt")
EXPECTED = sorted(FIXTURE_DIR.glob("*.npz"))

# The fixture README's tolerances (float32 against the official float32 run).
CODE_ATOL, CODE_RTOL = 1e-4, 1e-4
LOGPROB_ATOL = 2e-4
MARGIN = 1e-4  # predictions are compared where the top-1 / top-2 gap is above this


def _meta(npz: Path) -> dict:
    with np.load(npz, allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


def plain_checkpoint(tmp_dir: Path, npz: Path) -> Path:
    """The checkpoint of an expected-output file as the plain ``.ckpt`` a user holds."""
    name = _meta(npz)["ckpt"]
    target = tmp_dir / name
    if target.is_file():
        return target
    if (FIXTURE_DIR / name).is_file():
        return FIXTURE_DIR / name
    packed = FIXTURE_DIR / f"{name}.gz"
    assert packed.is_file(), f"{npz.name} names {name}, but neither it nor {packed.name} is in {FIXTURE_DIR}"
    with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("official_ckpt")


@pytest.fixture(scope="module")
def first_ckpt(ckpt_dir) -> Path:
    assert EXPECTED, f"no expected-output .npz in {FIXTURE_DIR}"
    return plain_checkpoint(ckpt_dir, EXPECTED[0])


def test_fixture_folder_has_expected_outputs():
    assert FIXTURE_DIR.is_dir(), (f"official checkpoint fixtures {FIXTURE_DIR} do not exist; set "
                                  "EAGLE_OFFICIAL_CKPT_FIXTURES")
    assert EXPECTED, f"no *.npz with expected outputs in {FIXTURE_DIR}"


# --------------------------------------------------------------------------- parity


def _report(rows: list[dict]) -> None:
    target = os.environ.get("EAGLE_OFFICIAL_CKPT_REPORT")
    if target:
        with open(target, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("npz", EXPECTED, ids=[p.stem for p in EXPECTED])
def test_parity_with_the_official_model(npz, ckpt_dir):
    from eagle_dist.evaluation.inference import load_model, resolve_checkpoint
    from eagle_dist.evaluation.loop import head_code, probe_predictions

    meta = _meta(npz)
    path, selection = resolve_checkpoint(plain_checkpoint(ckpt_dir, npz))
    loaded = load_model(path, device="cpu")
    cfg = loaded.cfg
    # The configuration comes from hyper_parameters: it must describe the recorded model.
    assert selection == "official checkpoint"
    assert cfg.model.backbone.startswith(f"{meta['model_type']}_patch{meta['patch']}_")
    assert (cfg.model.dim, cfg.model.n_classes, cfg.model.extra_clusters) == (
        meta["dim"], meta["n_classes"], meta["extra_clusters"])
    assert loaded.backbone.patch == meta["patch"]
    alpha = float(meta["cluster_alpha"])

    rows, failures = [], []
    with np.load(npz, allow_pickle=False) as z:
        for h, w in meta["sizes"]:
            size = f"{h}x{w}"
            img = torch.from_numpy(z[f"in__img_{size}"])
            code = head_code(loaded.backbone, loaded.heads, img, flip=False)
            cluster_scores, linear_logits = probe_predictions(loaded.heads, code, (h, w))
            ours = {
                "code_kk": code,
                "linear_logprobs_s4": F.log_softmax(linear_logits, dim=1)[:, :, ::4, ::4],
                "cluster_logprobs_s4": F.log_softmax(alpha * cluster_scores, dim=1)[:, :, ::4, ::4],
            }
            for name, value in ours.items():
                ref = z[f"out__{name}_{size}"].astype(np.float64)
                got = value.double().numpy()
                assert got.shape == ref.shape, f"{name} {size}: shape {got.shape} vs {ref.shape}"
                atol, rtol = (CODE_ATOL, CODE_RTOL) if name == "code_kk" else (LOGPROB_ATOL, 0.0)
                err = np.abs(got - ref)
                ratio = float((err / (atol + rtol * np.abs(ref))).max())
                rows.append({"fixture": npz.name, "size": size, "output": name, "max_abs_err": float(err.max()),
                             "atol": atol, "rtol": rtol, "worst_err_over_allowed": ratio})
                if ratio > 1:
                    failures.append(rows[-1])
            # Predictions at every pixel: compare where the reference's (cluster) or our own
            # (linear: the fixture has no linear margin) top-1 / top-2 gap rules out a tie.
            top2 = torch.log_softmax(linear_logits, dim=1).topk(2, dim=1).values
            linear_margin = (top2[:, 0] - top2[:, 1]).numpy()
            for name, pred, margin in (
                ("cluster_pred", cluster_scores.argmax(1).numpy(), z[f"out__cluster_margin_{size}"].astype(np.float32)),
                ("linear_pred", linear_logits.argmax(1).numpy(), linear_margin),
            ):
                ref = z[f"out__{name}_{size}"].astype(np.int64)
                decided = margin > MARGIN
                wrong = int(((pred != ref) & decided).sum())
                rows.append({"fixture": npz.name, "size": size, "output": name, "mismatches": wrong,
                             "compared": int(decided.sum()), "pixels": int(decided.size)})
                if wrong:
                    failures.append(rows[-1])
                assert decided.mean() > 0.5, f"{name} {size}: most pixels are ties; the fixture is degenerate"
    _report(rows)
    assert not failures, "outputs outside the README tolerances:\n" + "\n".join(json.dumps(r) for r in failures)


# --------------------------------------------------------------------------- safety and errors


class _Payload:
    """Unpickling this runs `command` through os.system: what a hostile checkpoint would hide."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _hostile(tmp_path: Path, marker: Path, where: str) -> Path:
    payload = _Payload(f"touch {marker}")
    cfg = {"model_type": "vit_small", "dino_patch_size": 8, "dim": 512, "payload": payload}
    state_dict = {"cluster_probe.clusters": torch.zeros(3, 2)}
    if where == "state_dict":
        state_dict["net.model.cls_token"] = payload
    path = tmp_path / f"hostile_{where}.ckpt"
    torch.save({"state_dict": state_dict, "hyper_parameters": {"n_classes": 27, "cfg": cfg}}, path)
    return path


@pytest.mark.parametrize("where", ["hyper_parameters", "state_dict"])
def test_a_hostile_pickle_is_read_without_running_it(tmp_path, where):
    from eagle_dist.method.official import OfficialCheckpointError, load_official_checkpoint

    path = _hostile(tmp_path, tmp_path / "pwned", where)
    # Control: the payload is live. An unrestricted load runs it (in a child process).
    control = tmp_path / "control"
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                    str(_hostile(tmp_path, control, where))], check=False, capture_output=True, timeout=120)
    assert control.exists(), "the hostile test file does not carry a working payload"

    if where == "state_dict":
        with pytest.raises(OfficialCheckpointError, match="net.model.cls_token") as err:
            load_official_checkpoint(path)
        assert "not tensors" in str(err.value)
    else:
        official = load_official_checkpoint(path)
        # The payload is inert data; the rest of the configuration was read.
        payload = official.hyper_parameters["cfg"]["payload"]
        assert isinstance(payload, str) and "system" in payload, payload
        assert official.cfg.model.backbone == "vit_small_patch8_224"
    assert not (tmp_path / "pwned").exists(), "the checkpoint reader executed a pickled command"


def _rewrite(tmp_path: Path, source: Path, name: str, edit) -> Path:
    """Re-save an official checkpoint after `edit(obj)`, with its config as plain data."""
    from eagle_dist.method.official import plain, read_checkpoint_file

    obj, _ = read_checkpoint_file(source)
    obj = {"state_dict": dict(obj["state_dict"]), "hyper_parameters": plain(obj["hyper_parameters"]),
           "global_step": obj.get("global_step", 0)}
    edit(obj)
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_missing_keys_are_one_error_naming_them(first_ckpt, tmp_path):
    from eagle_dist.evaluation.inference import load_model
    from eagle_dist.method.official import OfficialCheckpointError

    dropped = ["net.cluster2.2.weight", "linear_probe.bias", "net.model.blocks.3.attn.qkv.weight"]

    def edit(obj):
        for key in dropped:
            assert key in obj["state_dict"], f"the fixture checkpoint has no {key}"
            del obj["state_dict"][key]

    path = _rewrite(tmp_path, first_ckpt, "missing.ckpt", edit)
    with pytest.raises(OfficialCheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "missing keys" in message and all(key in message for key in dropped), message


def test_a_wrong_size_backbone_is_one_error_naming_the_keys(first_ckpt, tmp_path):
    from eagle_dist.method.official import OfficialCheckpointError, load_official_checkpoint
    from eagle_dist.method.eagle import build_model

    meta = _meta(EXPECTED[0])
    other = "vit_base" if meta["model_type"] != "vit_base" else "vit_small"

    def edit(obj):
        obj["hyper_parameters"]["cfg"]["model_type"] = other  # weights stay those of the fixture's ViT

    official = load_official_checkpoint(_rewrite(tmp_path, first_ckpt, "wrong_backbone.ckpt", edit))
    with pytest.raises(OfficialCheckpointError) as err:
        build_model(official.cfg, official=official)
    message = str(err.value)
    assert f"backbone {other}_patch" in message and "mis-shaped keys: net.model." in message, message


def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(tmp_path):
    from eagle_dist.evaluation.inference import load_model, resolve_checkpoint
    from eagle_dist.method.official import OfficialCheckpointError

    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    archive = tmp_path / "photos.ckpt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("photos/a.txt", "x")
    for path, expected in ((text, "is not a PyTorch checkpoint"), (archive, "no <name>/data.pkl")):
        with pytest.raises(OfficialCheckpointError, match=expected):
            load_model(resolve_checkpoint(path)[0])
    plain_tensor = tmp_path / "tensor.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain_tensor)
    with pytest.raises(OfficialCheckpointError, match="no 'state_dict'"):
        load_model(plain_tensor)


# --------------------------------------------------------------------------- end to end


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.mark.slow
def test_predict_and_evaluate_run_on_the_official_checkpoint(first_ckpt, tmp_path, capsys):
    from PIL import Image

    from eagle_dist.cli import predict, shard

    meta = _meta(EXPECTED[0])
    n_clusters = meta["n_classes"] + meta["extra_clusters"]
    rng = np.random.default_rng(0)
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (48, 33, 3), dtype=np.uint8)).save(images / "b.jpg")

    out = tmp_path / "pred"
    t0 = time.perf_counter()
    code = predict.main(["--checkpoint", str(first_ckpt), "--input", str(images), "--out", str(out),
                         "--resolution", "48", "--device", "cpu"])
    wall = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert code == 0
    assert "raw cluster ids" in printed and "official checkpoint" in printed, printed
    for stem, (w, h) in (("a", (56, 40)), ("b", (33, 48))):
        ids = np.asarray(Image.open(out / "labels" / f"{stem}.png"))
        assert ids.shape == (h, w) and ids.max() < n_clusters
        assert (out / "overlays" / f"{stem}.png").is_file()
    _report([{"fixture": EXPECTED[0].name, "predict_wall_s": wall, "images": 2, "resolution": 48}])

    from eagle_dist.cli import visualize

    figure = tmp_path / "eicue.png"
    assert visualize.main(["eigen", "--checkpoint", str(first_ckpt), "--input", str(images / "a.png"),
                           "--out", str(figure), "--resolution", "32", "--device", "cpu"]) == 0
    assert Image.open(figure).size[0] > 0

    val = tmp_path / "val"
    shard.main(["--source", "synthetic", "--split", "val", "--out", str(val), "--synthetic-count", "2",
                "--synthetic-size", "48x64", "--synthetic-classes", str(meta["n_classes"]),
                "--samples-per-shard", "2", "--quiet", "--workers", "1"])
    report_dir = tmp_path / "eval"
    done = subprocess.run(
        [sys.executable, "-m", "eagle_dist.evaluate", "--checkpoint", str(first_ckpt), "--shards", str(val),
         "--out", str(report_dir), "--no-crf", "--no-flip", "--no-mlflow", "--samples", "1",
         "data.val_resolution=48", "data.val_batch_size=2", "data.num_workers=0"],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((report_dir / "metrics.json").read_text())
    assert report["images"] == 2 and report["checkpoint"]["selected"] == "official checkpoint"
    assert len(report["assignment"]["strict"]) == n_clusters


def test_predict_refuses_a_broken_checkpoint_in_one_line(tmp_path, capsys):
    from eagle_dist.cli import predict

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    code = predict.main(["--checkpoint", str(broken), "--input", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "not a PyTorch checkpoint" in err, err


def test_convert_writes_a_folder_that_loads_without_unpickling(first_ckpt, tmp_path, monkeypatch):
    import pickle

    from eagle_dist.cli.convert import main as convert_main
    from eagle_dist.evaluation.inference import load_model, resolve_checkpoint

    out = tmp_path / "converted"
    assert convert_main([str(first_ckpt), str(out)]) == 0
    assert {p.suffix for p in out.rglob("*") if p.is_file()} <= {".safetensors", ".json", ".yaml", ""}
    official = load_model(first_ckpt)

    def refuse(*args, **kwargs):
        raise AssertionError("loading a converted checkpoint unpickled something")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    step_dir, selection = resolve_checkpoint(out)
    converted = load_model(step_dir)
    assert selection == "last" and converted.cfg == dataclasses_replace_weights(official.cfg, converted.cfg)
    for ours, theirs in ((converted.backbone, official.backbone), (converted.heads, official.heads)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert convert_main([str(first_ckpt), str(out)]) == 2  # a non-empty folder is not overwritten


def dataclasses_replace_weights(cfg, like):
    """`cfg` with the backbone weights path of `like` (the only key conversion changes)."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.weights = like.model.weights
    return cfg


@pytest.mark.slow
def test_init_from_starts_training_from_the_official_weights(first_ckpt, tmp_path):
    from eagle_dist.cli import shard
    from eagle_dist.evaluation.inference import load_model, resolve_checkpoint
    from eagle_dist.method.official import load_official_checkpoint

    official = load_official_checkpoint(first_ckpt)
    m = official.cfg.model
    for split in ("train", "val"):
        shard.main(["--source", "synthetic", "--split", split, "--out", str(tmp_path / split), "--synthetic-count", "2",
                    "--synthetic-size", "32x32", "--synthetic-classes", str(m.n_classes), "--samples-per-shard", "2",
                    "--quiet", "--workers", "1"])
    arch = [f"model.backbone={m.backbone}", f"model.dim={m.dim}", f"model.n_classes={m.n_classes}",
            f"model.extra_clusters={m.extra_clusters}", f"model.eigen_k={m.eigen_k}",
            f"model.eigen_clusters={m.eigen_clusters}"]
    small = ["data.resolution=32", "data.val_resolution=32", "data.batch_size=2", "data.val_batch_size=2",
             "data.num_workers=0", "data.shuffle_buffer=2", "loss.feature_samples=3", "loss.neg_samples=1",
             "train.max_steps=1", "train.log_interval=1", "train.eval_interval=100", "train.ckpt_interval=100",
             "eval.max_batches=1"]
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "train_harness.py"), str(tmp_path / "harness"), *arch, *small,
         f"model.init_from={first_ckpt}", f"data.train_shards={tmp_path / 'train'}",
         f"data.val_shards={tmp_path / 'val'}", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=ft"],
        capture_output=True, text=True, timeout=900, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "initialised the backbone and all heads from" in done.stdout + done.stderr

    trained = torch.load(tmp_path / "harness" / "rank0.pt", weights_only=True)
    lr = max(official.cfg.optim.lr, official.cfg.optim.lr_cluster, official.cfg.optim.lr_linear)
    for key, start in official.heads_state.items():
        # One Adam step moves every weight by at most about its learning rate.
        assert (trained[key] - start).abs().max() <= 1.01 * lr, key
    assert any(not torch.equal(trained[k], v) for k, v in official.heads_state.items()), "nothing was trained"
    # The run's checkpoints hold the heads; its frozen backbone is the official one.
    loaded = load_model(resolve_checkpoint(tmp_path / "runs" / "ft")[0])
    vit = loaded.backbone.vit.state_dict()
    assert all(torch.equal(vit[k], v) for k, v in official.backbone_state.items())
