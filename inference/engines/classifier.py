"""Classifier engine: the project's SkinClassifierNet, loaded from a local folder, with Grad-CAM.

Folder: ``config.json`` (:class:`ClassifierConfig`) + ``model.safetensors``.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from inference.engines.base import Prediction, model_sha256, pick_device
from inference.engines.classifier_net import (
    IMAGE_TYPES,
    WEIGHTS_NAME,
    ClassifierConfig,
    SkinClassifierEnsemble,
    SkinClassifierNet,
    build_classifier,
    dihedral_logits,
    dihedral_view,
    point_members,
    undo_dihedral_view,
)
from inference.engines.imaging import square_crop
from inference.engines.photo_type import PhotoTypeModel

TOP_K = 5
SUSPECT_FLAG = "suspect:"  # + condition code: probability at or above the model's validated threshold
PHOTO_TYPE_FLAG = "photo_type:"  # + "dermoscopic" | "clinical": whose operating points were applied
# The overlay is drawn no larger: the map has 6x6 to 12x12 cells and the console shows it 320 px wide, while
# drawing and encoding it at a 2048 px photo's size took 0.6 s of the worker's step (1024 px: a quarter)
SALIENCY_MAX_SIDE = 1024


def save_classifier(folder: str | Path, model: SkinClassifierNet | SkinClassifierEnsemble,
                    config: ClassifierConfig) -> Path:
    """Write a classifier folder exactly as :meth:`ClassifierEngine.load` reads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save(folder)
    return folder


class ClassifierEngine:
    def __init__(self, model: SkinClassifierNet | SkinClassifierEnsemble, config: ClassifierConfig, device: str,
                 weights_sha256: str,
                 photo_types: PhotoTypeModel | None = None) -> None:
        self.model = model.to(device).eval()
        self.config = config
        self.photo_types = photo_types  # None: every photo whose type is not given counts as clinical
        self.device = device
        self.weights_sha256 = weights_sha256
        self._mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(config.std).view(1, 3, 1, 1)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "ClassifierEngine":
        path = Path(path)
        config = ClassifierConfig.load(path)
        model = build_classifier(config)
        state = load_file(str(path / WEIGHTS_NAME))
        model.load_state_dict(state)
        return cls(model, config, pick_device(device), model_sha256(path / WEIGHTS_NAME), PhotoTypeModel.load(path))

    # --- preprocessing ---------------------------------------------------------------------
    def _square(self, image: Image.Image) -> Image.Image:
        """The same square view the net was trained on."""
        return square_crop(image, self.config.image_size)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(self._square(img), dtype=np.float32) / 255.0 for img in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (batch - self._mean) / self._std

    def _image_type(self, image_type: str, n: int) -> torch.Tensor:
        if image_type not in IMAGE_TYPES:
            raise ValueError(f"image_type must be one of {sorted(IMAGE_TYPES)}, not {image_type!r}")
        return torch.full((n,), IMAGE_TYPES[image_type], dtype=torch.long)

    # --- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, images: list[Image.Image], image_type: str) -> torch.Tensor:
        """Calibrated class probabilities, one row per image (B x num_classes, on CPU)."""
        x = self.preprocess(images).to(self.device)
        types = self._image_type(image_type, len(images)).to(self.device)
        logits = dihedral_logits(self.model, x, types, self.config.tta_views)
        return torch.softmax(logits.float() / self.config.temperature, dim=-1).cpu()

    def photo_type(self, image: Image.Image) -> str:
        """"dermoscopic" or "clinical" as the photo-type model reads it (clinical without one)."""
        return self.photo_types.photo_type(image) if self.photo_types is not None else "clinical"

    def predict(self, images: list[Image.Image], image_type: str | None = None, *,
                saliency: bool = True) -> list[Prediction]:
        """One prediction per photo. Without ``image_type`` each photo's type is read from the photo
        (:meth:`photo_type`); the type picks the operating points and is recorded as a flag."""
        if not images:
            return []
        if image_type is None:
            types = [self.photo_type(img) for img in images]
            by_type = {t: [i for i, x in enumerate(types) if x == t] for t in dict.fromkeys(types)}
            out: list[Prediction | None] = [None] * len(images)
            for t, idx in by_type.items():
                for i, p in zip(idx, self.predict([images[i] for i in idx], t, saliency=saliency), strict=True):
                    out[i] = p
            return [p for p in out if p is not None]
        t0 = time.perf_counter()
        probs = self.probabilities(images, image_type)
        t_infer = time.perf_counter() - t0
        cams: list[bytes | None] = [None] * len(images)
        t_cam = 0.0
        if saliency:
            t1 = time.perf_counter()
            cams = [self.saliency_png(img, image_type, int(p.argmax())) for img, p in zip(images, probs)]
            t_cam = time.perf_counter() - t1
        codes = self.config.class_codes
        predictions = []
        for row, cam in zip(probs, cams):
            order = torch.argsort(row, descending=True)[: min(TOP_K, len(codes))]
            differential = [{"code": codes[i], "probability": round(float(row[i]), 6)} for i in order.tolist()]
            flags = [f"{PHOTO_TYPE_FLAG}{image_type}", *self.flags(row, image_type)]
            predictions.append(
                Prediction(
                    engine="classifier",
                    model_id=self.config.model_id,
                    model_version=self.config.model_version,
                    weights_sha256=self.weights_sha256,
                    differential=differential,
                    saliency_png=cam,
                    flags=flags,
                    timings={"inference_s": t_infer / len(images), "saliency_s": t_cam / len(images)},
                )
            )
        return predictions

    def flags(self, row: torch.Tensor, image_type: str) -> list[str]:
        """``suspect:<code>`` for each operating point of this photo type the probabilities reach.

        "any_malignant" sums the malignant codes' probabilities and names the likeliest of them, so
        triage sees an ordinary per-condition flag (and advice speaks about that condition).
        """
        codes = self.config.class_codes
        points = self.config.operating_points.get(image_type) or self.config.thresholds
        flagged: list[str] = []
        for key, limit in sorted(points.items()):
            members = point_members(key, codes, self.config.malignant_codes)
            if not members or float(sum(row[codes.index(c)] for c in members)) < limit:
                continue
            code = max(members, key=lambda c: float(row[codes.index(c)]))
            if f"{SUSPECT_FLAG}{code}" not in flagged:
                flagged.append(f"{SUSPECT_FLAG}{code}")
        return flagged

    # --- Grad-CAM --------------------------------------------------------------------------
    def gradcam(self, image: Image.Image, image_type: str, class_index: int) -> np.ndarray:
        """Grad-CAM heat map (H x W in [0, 1], at the network's input size) for one class.

        Computed on the same dihedral views the prediction averages (one batch, one backward pass) and
        each view's map turned back before averaging: a single view's map carries the net's orientation
        artefacts (heat drifting to one border), which the views cancel as they do in the logits.
        """
        layers = self.model.target_layers(self.config.cam_stage)  # one per ensemble member
        acts: dict[int, torch.Tensor] = {}
        grads: dict[int, torch.Tensor] = {}
        hooks = []
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_hook(lambda _m, _i, out, i=i: acts.__setitem__(i, out)))
            hooks.append(layer.register_full_backward_hook(lambda _m, _gi, go, i=i: grads.__setitem__(i, go[0])))
        views = self.config.tta_views
        try:
            x = self.preprocess([image]).to(self.device)
            batch = torch.cat([dihedral_view(x, k) for k in range(views)]).requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(batch, self._image_type(image_type, views).to(self.device))
                self.model.zero_grad(set_to_none=True)
                logits[:, class_index].sum().backward()
        finally:
            for hook in hooks:
                hook.remove()
        # views x 1 x h x w, summed over ensemble members: the averaged logit's gradient already weighs each
        cams = torch.zeros(())
        for i in range(len(layers)):
            act, grad = acts[i].detach(), grads[i].detach()
            cams = cams + F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
        cam = torch.stack([undo_dihedral_view(cams[k : k + 1], k)[0, 0] for k in range(views)]).mean(0)
        size = self.config.image_size
        cam = F.interpolate(cam[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        cam = cam - cam.min()
        peak = float(cam.max())
        return (cam / peak).cpu().numpy() if peak > 0 else cam.cpu().numpy()

    def saliency_png(self, image: Image.Image, image_type: str, class_index: int) -> bytes:
        """The heat map overlaid on the photo, as PNG: the photo's frame, at most SALIENCY_MAX_SIDE px long."""
        rgb = image.convert("RGB")
        cam = self.gradcam(rgb, image_type, class_index)
        if max(rgb.size) > SALIENCY_MAX_SIDE:
            rgb.thumbnail((SALIENCY_MAX_SIDE, SALIENCY_MAX_SIDE), Image.Resampling.BILINEAR)
        # undo the centre crop: paste the square map back into the photo's frame
        w, h = rgb.size
        side = min(w, h)
        heat_sq = Image.fromarray((cam * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
        heat = Image.new("L", (w, h), 0)
        heat.paste(heat_sq, ((w - side) // 2, (h - side) // 2))
        colour = _jet(np.asarray(heat, dtype=np.float32) / 255.0)
        alpha = (np.asarray(heat, dtype=np.float32)[..., None] / 255.0) * 0.55
        blended = np.asarray(rgb, dtype=np.float32) * (1 - alpha) + colour * alpha
        out = io.BytesIO()
        # a photo-sized overlay hardly compresses (1.09 MB at level 1, 1.12 MB at the default 6), and level 1
        # encodes 3x faster: 66 instead of 225 ms for a 900x700 photo, most of a case's model step (issue 25)
        Image.fromarray(blended.clip(0, 255).astype(np.uint8)).save(out, format="PNG", compress_level=1)
        return out.getvalue()


def _jet(v: np.ndarray) -> np.ndarray:
    """A small 'jet' colour map (blue -> red) without pulling matplotlib into workers."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1) * 255.0
