"""What the benchmarks share: synthetic inputs and the machine/timing helpers.

    from eagle_dist.cli.bench.synth import synthetic_images, blurred
    img = synthetic_images(4, 224, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

import torch

from eagle_dist.constants import IMAGENET_MEAN, IMAGENET_STD
from eagle_dist.data.stream import gaussian_blur3


def synthetic_images(batch: int, size: int, regions: int = 5, noise: float = 0.05,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """ImageNet-normalised pictures of ``regions`` flat-coloured Voronoi cells plus Gaussian noise:
    ``[batch, 3, size, size]`` (the kind of input the parity fixtures use)."""
    centres_BR2 = torch.rand(batch, regions, 2, generator=generator) * size
    colours_BR3 = torch.rand(batch, regions, 3, generator=generator)
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    dist_BRHW = (yy - centres_BR2[:, :, 0, None, None]) ** 2 + (xx - centres_BR2[:, :, 1, None, None]) ** 2
    cell_BHW = dist_BRHW.argmin(dim=1)
    rgb_BHW3 = torch.gather(colours_BR3, 1, cell_BHW.reshape(batch, -1, 1).expand(-1, -1, 3))
    rgb_B3HW = rgb_BHW3.reshape(batch, size, size, 3).permute(0, 3, 1, 2)
    rgb_B3HW = (rgb_B3HW + noise * torch.randn(rgb_B3HW.shape, generator=generator)).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((rgb_B3HW - mean) / std).contiguous()


def blurred(img_B3HW: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    return gaussian_blur3(img_B3HW, torch.full((img_B3HW.shape[0],), sigma))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    return device


def machine(device: torch.device) -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        print(f"wrote {path}")


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the resident-set high-water mark of this process.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_rss_high_water"
