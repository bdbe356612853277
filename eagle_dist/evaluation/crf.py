"""DenseCRF refinement of the final evaluation (ALGORITHM.md section 9, step 4), on CPU workers.

    from eagle_dist.evaluation import crf
    crf.require()                                   # one clear error if the extra is missing
    with crf.CRFPool(workers=4) as pool:
        preds_BHW = pool.refine(images_BHW3_uint8, log_probs_BCHW)   # argmax of the marginals

Install the optional extra first: ``pip install 'eagle-dist[crf]'``.  It brings ``pydensecrf2``,
the maintained fork of ``pydensecrf`` (the package the official code calls; same ``pydensecrf``
import name and API).  PyPI has no wheel for it, so pip builds it from source: that needs a C++
compiler (``g++``) and takes about half a minute.

Official parameters, all fixed (the reference hard-codes them): Gaussian pairwise term
``sxy=1, compat=3``; bilateral term ``sxy=67, srgb=3, compat=4``; 10 mean-field iterations;
unary ``-log softmax`` (pydensecrf's ``unary_from_softmax``, probabilities clipped at 1e-5).
The image is un-normalised to uint8 the way ``to_pil_image`` does it (x 255, truncated) and
then channel-reversed to BGR, as the reference does; with equal colour bandwidths on all three
channels the order cannot change the result, but it costs nothing to keep.

The CRF is per image and single-threaded, so images are spread over a process pool.  Workers
are spawned (not forked): the parent may already hold a gloo process group and OpenMP threads,
neither of which survive a fork safely.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from eagle_dist.errors import EagleError

INSTALL_HINT = "pip install 'eagle-dist[crf]'"
GAUSSIAN_SXY = 1
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 67
BILATERAL_SRGB = 3
BILATERAL_COMPAT = 4
ITERATIONS = 10

PARAMS = {
    "gaussian": {"sxy": GAUSSIAN_SXY, "compat": GAUSSIAN_COMPAT},
    "bilateral": {"sxy": BILATERAL_SXY, "srgb": BILATERAL_SRGB, "compat": BILATERAL_COMPAT},
    "iterations": ITERATIONS,
    "unary": "-log softmax (clipped at 1e-5)",
    "image": "un-normalised uint8, BGR",
}


class CRFUnavailableError(EagleError, RuntimeError):
    """DenseCRF was asked for but its package is not installed."""


def require():
    """Import pydensecrf or raise one error that says how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils  # noqa: F401
    except ImportError as err:
        raise CRFUnavailableError(
            f"DenseCRF is not installed ({err}). Install the optional extra with `{INSTALL_HINT}` "
            "(it builds pydensecrf2 from source: a C++ compiler is needed), or evaluate without "
            "the CRF (--no-crf; not the official protocol)."
        ) from None
    return dcrf


def to_uint8(img_B3HW: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised images -> ``[B, H, W, 3]`` uint8 RGB, truncating like ``to_pil_image``."""
    from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=img_B3HW.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img_B3HW.device).view(1, 3, 1, 1)
    rgb = (img_B3HW.float() * std + mean).mul(255).clamp(0, 255)
    return rgb.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def dense_crf(image_HW3: np.ndarray, log_probs_CHW: np.ndarray) -> np.ndarray:
    """CRF marginals ``[C, H, W]`` of one image with the official parameters."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = log_probs_CHW.shape
    if image_HW3.shape != (h, w, 3):
        raise ValueError(f"image {image_HW3.shape} does not match the {h}x{w} probability map")
    # softmax of log-softmax is the softmax: the reference does exactly this round trip.
    logits = log_probs_CHW.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=0, keepdims=True))
    probs = (probs / probs.sum(axis=0, keepdims=True)).astype(np.float32)
    model = dcrf.DenseCRF2D(w, h, c)
    model.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    model.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    bgr = np.ascontiguousarray(image_HW3[:, :, ::-1])
    model.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=bgr, compat=BILATERAL_COMPAT)
    return np.asarray(model.inference(ITERATIONS), dtype=np.float32).reshape(c, h, w)


def _refine_one(args: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    image, log_probs = args
    # Only the argmax travels back: a quarter of the bytes of int32 marginals per label.
    return dense_crf(image, log_probs).argmax(axis=0).astype(np.int16)


class CRFPool:
    """A pool of CPU workers running :func:`dense_crf`; ``workers=0`` runs in this process."""

    def __init__(self, workers: int):
        require()
        self.workers = max(0, int(workers))
        self._pool = None
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def refine(self, images_BHW3: np.ndarray, *log_probs: torch.Tensor) -> list[torch.Tensor]:
        """CRF argmax ``[B, H, W]`` (int64) for each ``[B, C, H, W]`` log-probability tensor.

        All maps of the call go to the pool at once so the workers stay busy across them.
        """
        jobs = [(images_BHW3[i], lp[i].detach().float().cpu().numpy())
                for lp in log_probs for i in range(lp.shape[0])]
        if self._pool is None:
            results = [_refine_one(job) for job in jobs]
        else:
            results = list(self._pool.map(_refine_one, jobs))
        out, b = [], images_BHW3.shape[0]
        for k, lp in enumerate(log_probs):
            out.append(torch.from_numpy(np.stack(results[k * b:(k + 1) * b])).long().to(lp.device))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "CRFPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
