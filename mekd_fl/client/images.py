"""Reading a device's images, in whatever form a Flower project holds them, as one uint8 tensor.

Why written here: a Flower project's images come as tensors or arrays, torch Datasets, DataLoaders of
images, (image, label) pairs or flwr-datasets dicts, floats in [0, 1] or uint8, PIL images. MEKD needs
them once, as uint8 (N, C, H, W), because queries travel to the teacher as a camera would send them.
Shapes are taken exactly as documented: a batch is (N, C, H, W); only a single sample may leave out
its channel axis ((H, W) for one channel). Labels are never read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

ImageSource = torch.Tensor | np.ndarray | torch.utils.data.Dataset | Iterable

#: Keys a dict sample or batch may keep its images under (flwr-datasets and Hugging Face names).
IMAGE_KEYS = ("img", "image", "images", "pixel_values", "x")


def _image_of(sample: Any, image_key: str | None) -> Any:
    """The image part of a sample or batch: itself, the first of a (image, label) pair, or a dict entry."""
    if isinstance(sample, Mapping):
        keys = [image_key] if image_key else [k for k in IMAGE_KEYS if k in sample]
        if not keys or keys[0] not in sample:
            raise ValueError(
                f"no image in a sample with keys {sorted(sample)}; pass image_key= "
                f"(looked for {', '.join([image_key] if image_key else IMAGE_KEYS)})"
            )
        return sample[keys[0]]
    if isinstance(sample, (tuple, list)) and sample and not isinstance(sample[0], (int, float)):
        return sample[0]
    return sample


def _to_uint8(images: Any, batched: bool) -> torch.Tensor:
    """One image or a batch as uint8 (N, C, H, W)."""
    if hasattr(images, "mode") and hasattr(images, "size") and not isinstance(images, (torch.Tensor, np.ndarray)):
        images = np.asarray(images)  # a PIL image: (H, W) or (H, W, C)
        images = images[None] if images.ndim == 2 else images.transpose(2, 0, 1)
        batched = False
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    t = t.detach().cpu()
    if not batched:  # one sample: (C, H, W), or (H, W) for one channel
        t = (t.unsqueeze(0) if t.ndim == 2 else t).unsqueeze(0)
    if t.ndim != 4:
        what = "a batch of images" if batched else "one image"
        accepted = "(N, C, H, W)" if batched else "(C, H, W) or (H, W)"
        hint = "; add the channel axis, e.g. images[:, None]" if batched and t.ndim == 3 else ""
        raise ValueError(f"{what} of shape {tuple(t.shape)} is not accepted; accepted: {accepted}{hint}")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if t.dtype.is_floating_point:
        if t.numel() and (not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1):
            raise ValueError(
                "float images must lie in [0, 1] (what ToTensor gives); pass the raw images and "
                "put the normalisation in preprocess= instead"
            )
        return t.mul(255).round().to(torch.uint8).contiguous()
    if t.dtype in (torch.int16, torch.int32, torch.int64) and (t.numel() == 0 or (t.min() >= 0 and t.max() <= 255)):
        return t.to(torch.uint8).contiguous()
    raise ValueError(f"images of dtype {t.dtype} are not accepted; accepted: uint8, or floats in [0, 1]")


def as_uint8_images(source: ImageSource, image_key: str | None = None) -> torch.Tensor:
    """The images of `source` as one uint8 tensor (N, C, H, W), read once.

    Accepted: a tensor or numpy array of images; a torch Dataset whose items are images, (image, label)
    pairs or dicts (`image_key`, else the first of IMAGE_KEYS); a DataLoader (or any iterable of
    batches) of the same. Labels are never read.
    """
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return _to_uint8(source, batched=True)
    if isinstance(source, torch.utils.data.DataLoader) or (
        not isinstance(source, torch.utils.data.Dataset) and isinstance(source, Iterable)
    ):
        parts = [_to_uint8(_image_of(batch, image_key), batched=True) for batch in source]
    elif isinstance(source, torch.utils.data.Dataset):
        parts = [_to_uint8(_image_of(source[i], image_key), batched=False) for i in range(len(source))]
    else:
        raise ValueError(
            f"images: a {type(source).__name__} is not accepted; accepted: a uint8 tensor or array, "
            "a torch Dataset or a DataLoader"
        )
    if not parts:
        raise ValueError("images: the source holds no image")
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"images: all images must have one shape; got {sorted(shapes)}")
    return torch.cat(parts)
