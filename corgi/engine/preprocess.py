"""Image -> patches for the Qwen-VL vision tower, with the heavy part on the model's device.

Same output as transformers' Qwen2VLImageProcessorPil (tests compare them): bicubic resize
in PIL on uint8 (fast C code), then rescale, normalise and patchify as tensor ops on the
device. The PIL processor does those steps in float NumPy on the CPU: 235 ms for a
1232x896 image on the H100 host, measured, which sat on every first turn's critical path.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_patches(images: list[Image.Image], processor, min_pixels: int, max_pixels: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> pixel_values [sum of patches, C*T*P*P] float32 on `device`, grid_thw [n, 3] int64."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    patch, merge, temporal = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    mean = torch.tensor(processor.image_mean, device=device).view(3, 1, 1)
    std = torch.tensor(processor.image_std, device=device).view(3, 1, 1)
    all_patches, grids = [], []
    for image in images:
        height, width = smart_resize(image.height, image.width, factor=patch * merge,
                                     min_pixels=min_pixels, max_pixels=max_pixels)
        resized = image.convert("RGB").resize((width, height), resample=Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized).copy()).to(device)             # [H, W, 3] uint8
        x = pixels.permute(2, 0, 1).float() * processor.rescale_factor                 # [3, H, W]
        x = (x - mean) / std
        gh, gw = height // patch, width // patch
        # (C, gh/m, m, P, gw/m, m, P) -> (gh/m, gw/m, m, m, C, P, P): merge groups stay contiguous
        x = x.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
        # one still frame repeated over the temporal patch
        x = x.unsqueeze(5).expand(*x.shape[:5], temporal, patch, patch)
        all_patches.append(x.reshape(gh * gw, 3 * temporal * patch * patch))
        grids.append([1, gh, gw])
    return torch.cat(all_patches), torch.tensor(grids, dtype=torch.long)
