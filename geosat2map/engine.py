"""Running the generator on batches of tiles.

The model runs in eval mode: BatchNorm uses its learned running statistics and dropout is off,
so a tile's output depends only on that tile, never on the other tiles in its batch (the
pix2pix reference keeps train-mode BatchNorm at test time, which couples batch mates).
"""

from __future__ import annotations

import numpy as np
import torch


class InferenceEngine:
    """Turns float32 0..255 tiles (N, C, T, T) into float32 0..255 map tiles (N, 3, T, T)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        # bf16 autocast on CUDA only: CPUs without bf16 units run it ~3x slower than fp32.
        self.autocast = device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(tiles).to(self.device, non_blocking=True)
        x = (x / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            y = self.model(x)
        y = (y.float().clamp_(-1.0, 1.0) + 1.0) * 127.5
        return y.cpu().numpy()
