"""Pictures of what a checkpoint computes.  One figure so far: EiCue for one image.

    python -m eagle_dist.visualize eigen --checkpoint runs/NAME --input photo.jpg
    python -m eagle_dist.visualize eigen --checkpoint runs/NAME/checkpoints/step-00000400 \\
        --input photo.jpg --out eicue.png --kmeans-on head

``eigen`` draws one PNG row: the image (resized as ``eagle_dist.cli.predict`` resizes it: shorter
side = the checkpoint's ``data.val_resolution``, sides multiples of the patch), the first
``model.eigen_k - 1`` non-trivial eigenvectors of the image's EiCue graph Laplacian as heat maps
(blue negative, red positive; the sign of an eigenvector is arbitrary), the EiCue cluster map
(the trained eigen cluster probe on those eigenvectors, as in training) and, next to it, k-means
with as many clusters as EiCue used.  By default k-means runs on the same spectral features
(cosine geometry, like the probe), so the two maps differ only by the clustering;
``--kmeans-on head`` clusters the segmentation-head features instead.  k-means ids are matched
to EiCue ids (Hungarian on the overlap) so that the same segment has the same colour.

Default output: ``<run>/figures/eicue-<image stem>-step-XXXXXXXX.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eagle_dist.errors import EagleError
from eagle_dist.evaluation.inference import (
    DEFAULT_MAX_IMAGE_PIXELS,
    open_checkpoint,
    open_image,
    pick_device,
)


def _match_ids(reference_HW: np.ndarray, other_HW: np.ndarray, n_ids: int) -> np.ndarray:
    """Relabel `other` so each of its clusters takes the reference id it overlaps most (1:1)."""
    from scipy.optimize import linear_sum_assignment

    k = int(other_HW.max()) + 1
    overlap = np.zeros((k, n_ids), dtype=np.int64)
    np.add.at(overlap, (other_HW.ravel(), reference_HW.ravel()), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    table = np.arange(k) + n_ids  # clusters left without a partner get fresh ids
    table[rows] = cols
    return table[other_HW]


@torch.no_grad()
def eigen_figure(loaded, image: Image.Image, out: Path, short_side: int, kmeans_on: str = "spectral",
                 seed: int = 0) -> dict:
    """Compute and draw the EiCue figure; returns the maps (for tests and callers)."""
    from eagle_dist.evaluation import figures
    from eagle_dist.evaluation.inference import model_input
    from eagle_dist.evaluation.loop import cosine_kmeans

    device = next(loaded.heads.parameters()).device
    x = model_input(image, short_side, loaded.backbone.patch).to(device)
    code = loaded.heads.seg_head(loaded.backbone(x))
    spectral, eicue_map, _ = loaded.heads.eicue(code, x, loaded.heads.eigen_probe)
    _, k_vec, h, w = spectral.shape
    eicue_HW = eicue_map[0].cpu().numpy()
    n_segments = max(2, len(np.unique(eicue_HW)))
    feats = spectral if kmeans_on == "spectral" else code
    tokens_ND = feats[0].flatten(1).T.cpu()
    centres = cosine_kmeans(tokens_ND, n_segments, seed=seed)
    kmeans_HW = (torch.nn.functional.normalize(tokens_ND, dim=1) @ centres.T).argmax(1).reshape(h, w).numpy()
    n_ids = loaded.cfg.model.eigen_clusters
    kmeans_HW = _match_ids(eicue_HW, kmeans_HW, n_ids)
    shown = figures.denormalize(x[0])
    figures.eigen_png(
        shown, spectral[0].cpu().numpy(), eicue_HW, kmeans_HW, out, n_colors=n_ids + n_segments,
        kmeans_title=f"k-means ({kmeans_on}, k={n_segments})",
    )
    return {"eigenvectors": spectral[0].cpu(), "eicue": eicue_HW, "kmeans": kmeans_HW, "k": k_vec}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eagle_dist.visualize", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    eigen = sub.add_parser("eigen", help="EiCue figure for one image: eigenvectors, EiCue map, k-means")
    eigen.add_argument("--checkpoint", required=True,
                       help="run folder (newest complete checkpoint), step folder, or an official EAGLE .ckpt")
    eigen.add_argument("--step", type=int, default=None, help="use this step of the run folder")
    eigen.add_argument("--input", required=True, help="one image file")
    eigen.add_argument("--out", default=None, help="PNG path (default: <run>/figures/eicue-<stem>-<step>.png)")
    eigen.add_argument("--resolution", type=int, default=None,
                       help="shorter side fed to the ViT (default: the checkpoint's data.val_resolution)")
    eigen.add_argument("--kmeans-on", choices=("spectral", "head"), default="spectral",
                       help="features for the k-means panel (default: the same spectral features as EiCue)")
    eigen.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    eigen.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                       help=f"refuse larger images (default {DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's "
                            "decompression-bomb guard; 0 = no limit)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        loaded, _ = open_checkpoint(args.checkpoint, args.step, pick_device(args.device))
        image = open_image(args.input, args.max_image_pixels or None)
    except EagleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (
        loaded.run_dir / "figures" / f"eicue-{Path(args.input).stem}-{loaded.tag}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    eigen_figure(loaded, image, out, args.resolution or loaded.cfg.data.val_resolution, args.kmeans_on,
                 seed=loaded.cfg.train.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
