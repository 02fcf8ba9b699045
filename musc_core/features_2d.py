"""2D patch features from a timm Vision Transformer (paper §III-A).

The extractor returns, for each requested block, the patch tokens (prefix tokens dropped) passed
through the model's final LayerNorm, via timm's ``forward_intermediates``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from musc_core.attention import use_native_attention
from musc_core.checkpoints import RANDOM_SEED, file_digest, load_checkpoint

_WRAPPER_KEYS = ("teacher", "student", "state_dict", "model", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


def unwrap_state_dict(content: object) -> dict[str, torch.Tensor]:
    """Find the model's tensors in a checkpoint's content.

    Accepts a bare state dict or one nested under the usual wrapper keys (``teacher`` and
    ``student`` of the original DINO release, ``state_dict``, ``model``).

    Args:
        content: what ``torch.load`` returned.

    Returns:
        Flat mapping of parameter name to tensor.
    """
    if not isinstance(content, dict):
        raise ValueError(f"checkpoint holds a {type(content).__name__}, expected a state dict")
    for key in _WRAPPER_KEYS:
        inner = content.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return unwrap_state_dict(inner)
    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("checkpoint holds no tensors")
    return tensors


def map_vit_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Translate a ViT checkpoint's key names to the timm model's.

    Handles timm's own names, the original DINO release (``backbone.``/``module.`` prefixes,
    projection ``head.*`` keys that a feature extractor does not use) and everything timm's
    ``checkpoint_filter_fn`` converts (OpenAI CLIP, position-embedding resampling).

    Args:
        state: raw checkpoint tensors.
        model: the timm VisionTransformer the weights are for.

    Returns:
        State dict with the model's key names.
    """
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("head.") or key.startswith("head_dist."):
            continue
        stripped[key] = value
    return checkpoint_filter_fn(stripped, model)


def state_digest(model: nn.Module) -> str:
    """SHA-256 over a model's parameters and buffers (names, shapes and bytes), hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ViTFeatureExtractor:
    """Multi-layer patch tokens of a timm ViT.

    Attributes:
        model: the timm VisionTransformer, in eval mode.
        name: timm model name.
        identity: backbone identity for cache keys and reports (name + weights digest).
        random_weights: True when the weights are a random initialization (results are then
            not meaningful and every output must say so).
        patch_size: pixels per patch side.
        mean: per-channel normalization mean (from the model's pretrained config).
        std: per-channel normalization std.
        native_attention_layers: attention layers routed to musc's native bf16 kernel
            (:func:`musc_core.attention.use_native_attention`; used in bf16 on CPUs with
            AVX512-BF16, timm's own forward otherwise).
    """

    def __init__(
        self, model: nn.Module, name: str, weights_label: str, random_weights: bool
    ) -> None:
        self.model = model.eval()
        self.name = name
        self.random_weights = random_weights
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.num_blocks = len(model.blocks)
        self.identity = f"{name}:{weights_label}"
        self.native_attention_layers = use_native_attention(self.model)

    @classmethod
    def create(
        cls,
        name: str,
        weights: str,
        image_size: int,
        patch_size: int | None = None,
    ) -> ViTFeatureExtractor:
        """Build an extractor from a timm model name and a weights source.

        Args:
            name: any timm ViT name, e.g. ``vit_base_patch8_224.dino``.
            weights: ``"pretrained"`` (timm's pretrained weights, from the hub or its local
                cache), ``"random"`` (explicit random initialization, seeded), or the path of
                a local checkpoint (timm or original DINO key names, loaded with
                ``weights_only=True``).
            image_size: input side in pixels; position embeddings are resampled to it.
            patch_size: override the model's patch size (random weights only; used for small
                test models).

        Returns:
            The extractor.
        """
        extra: dict[str, int] = {}
        if patch_size is not None:
            if weights != "random":
                raise ValueError("patch_size can only be overridden with random weights")
            extra["patch_size"] = patch_size
        if weights == "pretrained":
            try:
                model = timm.create_model(
                    name, pretrained=True, num_classes=0, img_size=image_size
                )
            except Exception as error:  # hub unreachable, cache empty, unknown tag
                raise RuntimeError(
                    f"could not load timm pretrained weights for {name!r} ({error}). Put them in "
                    "the timm/Hugging Face cache, pass a local checkpoint "
                    "(--weights-2d /path/to/checkpoint.pth), or request random weights "
                    "explicitly (--weights-2d random; results not meaningful)"
                ) from error
            return cls(model, name, f"pretrained-{state_digest(model)[:16]}", False)
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model = timm.create_model(
                    name, pretrained=False, num_classes=0, img_size=image_size, **extra
                )
            return cls(model, name, f"random-seed{RANDOM_SEED}", True)
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"2D weights {weights!r}: not 'pretrained', not 'random' and no such file"
            )
        content = load_checkpoint(path, name)
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
        state = map_vit_keys(unwrap_state_dict(content), model)
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head")]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}")
        return cls(model, name, f"sha256-{file_digest(path)[:16]}", False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the backbone's mean/std to images in [0, 1], shape (B, 3, S, S)."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)
        return (images - mean[:, None, None]) / std[:, None, None]

    @torch.inference_mode()
    def extract(
        self,
        images: torch.Tensor,
        layers: Sequence[int],
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """Patch tokens of the given blocks, each through the final LayerNorm.

        Args:
            images: (N, 3, S, S) float in [0, 1] (not yet normalized), on the model's device.
            layers: 1-based block numbers, e.g. (4, 8, 12).
            batch_size: images per forward pass.
            progress: called with the number of images finished after each batch.

        Returns:
            One (N, M, C) float32 tensor per layer, M = (S / patch)².
        """
        if max(layers) > self.num_blocks:
            raise ValueError(f"{self.name} has {self.num_blocks} blocks, asked for {layers}")
        indices = [layer - 1 for layer in layers]
        outputs: list[list[torch.Tensor]] = [[] for _ in layers]
        for start in range(0, images.shape[0], batch_size):
            batch = self.normalize(images[start : start + batch_size].float())
            tokens = self.model.forward_intermediates(
                batch, indices=indices, norm=True, output_fmt="NLC", intermediates_only=True
            )
            for slot, layer_tokens in zip(outputs, tokens, strict=True):
                slot.append(layer_tokens.float())
            if progress is not None:
                progress(min(start + batch_size, images.shape[0]))
        return [torch.cat(slot) for slot in outputs]

    def to(self, device: torch.device | str) -> ViTFeatureExtractor:
        """Move the model to a device; returns self."""
        self.model.to(device)
        return self
