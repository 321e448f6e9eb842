"""A trained model as a function of 2D slices: load, pick a device, tile, batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cemcurate.common.device import select_device
from finetune.models import UNet2D, build_model, logits_to_probs
from finetune.predict.tiling import TilePlan, plan_tiles, predict_tiled


def default_batch_pixels(device: torch.device) -> int:
    """Pixels (voxels) per forward pass when not configured: 512^2 on CPU, 8 x 512^2 on CUDA."""
    return 8 * 512 * 512 if device.type == "cuda" else 512 * 512


def model_file(path: str | Path) -> Path:
    """``RUN/model.pth`` for a run folder, else ``path`` itself."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.pth"
        if not candidate.is_file():
            raise FileNotFoundError(f"{path}: no model.pth in this run folder; has training finished? "
                                    "(checkpoint.pth is resumable state, not a final model)")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet2D, dict]:
    """Rebuild a trained model from ``RUN`` or ``RUN/model.pth``.

    Returns:
        ``(model in eval mode on device, saved payload without the weights)``; the
        payload holds ``model_config``, ``classes`` and the training ``config``.
    """
    path = model_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise ValueError(f"{path}: not a finetune model file (expected keys state_dict and model_config)")
    cfg = dict(payload["model_config"])
    model = build_model(cfg.pop("model"), **cfg)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.to(device).eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info


class SlicePredictor:
    """Probabilities for batches of 2D slices, tiled and batched.

    Args:
        model: a segmentation model taking ``(B, 1, H, W)`` in [0, 1] and returning logits.
        device: where the model runs (the model is moved there).
        amp: float16 autocast on CUDA.
        tile, overlap: tiling (see :func:`finetune.predict.tiling.plan_tiles`).
        batch_size: most tiles per forward pass.
        batch_pixels: most pixels per forward pass (0: 512^2 on CPU, 8 x 512^2 on CUDA). On a
            CPU, batching small tiles pays (2.3x per 96^2 slice for a resnet18 UNet) but
            batching 512^2 tiles is 20-30% slower per slice than one at a time (cache), so
            the batch is ``min(batch_size, batch_pixels // tile pixels)``, at least 1.

    ``predictor(slices float32[N, H, W] in [0, 1]) -> float32[N, C, H, W]`` probabilities.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", amp: bool = True,
                 tile: int = 512, overlap: int = 64, batch_size: int = 8, batch_pixels: int = 0):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.amp = amp and self.device.type == "cuda"
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.batch_pixels = batch_pixels or default_batch_pixels(self.device)
        self._plans: dict[tuple[int, int], TilePlan] = {}

    @torch.inference_mode()
    def model_fn(self, tiles: np.ndarray) -> np.ndarray:
        """``float32[B, h, w]`` (h, w multiples of 32) -> ``float32[B, C, h, w]`` probabilities."""
        x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))[:, None].to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.model(x)
        return logits_to_probs(logits).cpu().numpy()

    def plan(self, shape: tuple[int, int]) -> TilePlan:
        shape = (int(shape[0]), int(shape[1]))
        if shape not in self._plans:
            self._plans[shape] = plan_tiles(shape, self.tile, self.overlap)
        return self._plans[shape]

    def __call__(self, slices: np.ndarray) -> np.ndarray:
        plan = self.plan(slices.shape[1:])
        batch = max(1, min(self.batch_size, self.batch_pixels // (plan.tile[0] * plan.tile[1])))
        return predict_tiled(slices, self.model_fn, plan, batch)
