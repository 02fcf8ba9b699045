"""3D group features from the Point-MAE point transformer (SPEC §2.2).

The model is the encoder half of Point-MAE: a mini-PointNet embeds each group of points
(coordinates relative to the group centre) into one token, a positional embedding of the centre
is added before every one of the 12 transformer blocks, and the tokens of the requested blocks
are returned through the final LayerNorm. Module names follow the Point-MAE release, so its
pre-training checkpoint loads after stripping the ``module.`` and ``MAE_encoder.`` prefixes.

Inference is deterministic (no dropout, no stochastic depth). The reference never switches the
model to eval mode, so its BatchNorm layers normalize with the statistics of the sample being
encoded; ``batchnorm="sample"`` reproduces that for every sample of a batch independently,
``batchnorm="running"`` uses the checkpoint's running statistics instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musc_core.checkpoints import RANDOM_SEED, file_digest, load_checkpoint
from musc_core.config import BATCHNORM_MODES
from musc_core.grouping import Grouping

WIDTH = 384
DEPTH = 12
HEADS = 6
MLP_RATIO = 4
_PREFIXES = ("module.", "MAE_encoder.", "base_model.")
_MODEL_PARTS = ("encoder.", "pos_embed.", "blocks.", "norm.")


class Encoder(nn.Module):
    """Mini-PointNet: one token per group of points.

    ``first_conv`` (Conv1d 3→128, BatchNorm, ReLU, Conv1d 128→256) runs on every point; the
    per-group max is concatenated to every point's features (global first, 512 channels);
    ``second_conv`` (Conv1d 512→512, BatchNorm, ReLU, Conv1d 512→384) runs on every point and
    the per-group max is the token. The 1-wide convolutions are evaluated as matrix products on
    channels-last tensors, and the global half of the first 512→512 product once per group.
    """

    def __init__(self, channels: int = WIDTH) -> None:
        super().__init__()
        self.channels = channels
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, channels, 1),
        )

    @staticmethod
    def _batchnorm_relu(x: torch.Tensor, norm: nn.BatchNorm1d, mode: str) -> torch.Tensor:
        """BatchNorm over (B, G, K, C) then ReLU, in place.

        ``"sample"``: each sample's mean and biased variance over its G·K points (what a
        train-mode BatchNorm computes for a batch of one sample); ``"running"``: the module's
        running statistics. Always computed in float32, so that under bfloat16 autocast only
        the matrix products run in bfloat16.
        """
        x = x.float()  # statistics in float32 also under bfloat16 autocast (no copy in fp32)
        if mode == "sample":
            # Two passes (mean, then the mean square of the centred values): as accurate as
            # var_mean and about twice as fast on the CPU for these channels-last tensors.
            x.sub_(x.mean(dim=(1, 2), keepdim=True))
            var = x.square().mean(dim=(1, 2), keepdim=True)
            return x.mul_(torch.rsqrt(var + norm.eps) * norm.weight).add_(norm.bias).relu_()
        scale = torch.rsqrt(norm.running_var + norm.eps) * norm.weight
        shift = norm.bias - norm.running_mean * scale
        return x.mul_(scale).add_(shift).relu_()

    def forward(self, groups: torch.Tensor, batchnorm: str = "sample") -> torch.Tensor:
        """Tokens of point groups.

        Args:
            groups: (B, G, K, 3) point coordinates relative to their group centre.
            batchnorm: ``"sample"`` or ``"running"``.

        Returns:
            (B, G, C) group tokens.
        """
        conv1, norm1, _, conv2 = self.first_conv
        conv3, norm2, _, conv4 = self.second_conv
        half = conv2.out_channels
        x = F.linear(groups, conv1.weight.squeeze(-1), conv1.bias)  # (B, G, K, 128)
        x = self._batchnorm_relu(x, norm1, batchnorm)
        local = F.linear(x, conv2.weight.squeeze(-1), conv2.bias)  # (B, G, K, 256)
        pooled = local.amax(dim=2)  # (B, G, 256)
        weight3 = conv3.weight.squeeze(-1)
        # second_conv[0] on cat([global, local]): the global half is constant within a group.
        x = F.linear(local, weight3[:, half:]).float()
        x += F.linear(pooled, weight3[:, :half], conv3.bias).float().unsqueeze(2)
        del local
        x = self._batchnorm_relu(x, norm2, batchnorm)
        x = F.linear(x, conv4.weight.squeeze(-1), conv4.bias)  # (B, G, K, C)
        return x.amax(dim=2)


class Attention(nn.Module):
    """Multi-head self-attention without qkv bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens of each sample: (B, N, C) → (B, N, C)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d) each
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Two linear layers with an exact GELU between them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, C) → (…, C)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (no dropout, no stochastic depth)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, N, C)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """The block stack (named ``blocks.blocks`` in Point-MAE checkpoints)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])


class PointTransformer(nn.Module):
    """Point-MAE encoder: mini-PointNet tokens, centre positional embedding, 12 blocks.

    Attributes:
        batchnorm: ``"sample"`` (per-sample statistics) or ``"running"`` (checkpoint's).
        weights_label: where the weights came from, e.g. ``"sha256-<16 hex>"`` of the checkpoint
            file or ``"random-seed0"`` (set by :func:`load_point_mae`).
        random_weights: True for a random initialization.
    """

    def __init__(
        self,
        batchnorm: str = "sample",
        width: int = WIDTH,
        depth: int = DEPTH,
        heads: int = HEADS,
        mlp_ratio: int = MLP_RATIO,
    ) -> None:
        super().__init__()
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
        self.batchnorm = batchnorm
        self.width = width
        self.encoder = Encoder(width)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        self.blocks = TransformerEncoder(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.weights_label = "unset"
        self.random_weights = False

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks.blocks)

    def forward_intermediates(
        self, neighbourhood: torch.Tensor, centres: torch.Tensor, indices: Sequence[int]
    ) -> list[torch.Tensor]:
        """Group tokens after the given blocks, each through the final LayerNorm.

        The centre's positional embedding is added to the tokens before every block:
        ``x = block(x + pos)``.

        Args:
            neighbourhood: (B, G, K, 3) group members relative to their centre.
            centres: (B, G, 3) group centres.
            indices: 1-based block numbers, e.g. (4, 8, 12).

        Returns:
            One (B, G, C) tensor per requested block, in the order asked.
        """
        wanted = [int(i) for i in indices]
        if not wanted or min(wanted) < 1 or max(wanted) > self.depth:
            raise ValueError(f"block numbers must be in [1, {self.depth}], got {tuple(indices)}")
        x = self.encoder(neighbourhood, self.batchnorm)
        pos = self.pos_embed(centres)
        outputs: dict[int, torch.Tensor] = {}
        for number, block in enumerate(self.blocks.blocks[: max(wanted)], start=1):
            x = block(x + pos)
            if number in wanted:
                outputs[number] = self.norm(x)
        return [outputs[i] for i in wanted]


def map_point_mae_keys(state: dict) -> dict[str, torch.Tensor]:
    """Translate a Point-MAE checkpoint to :class:`PointTransformer` key names.

    Accepts the pre-training checkpoint's content (``{"base_model": {...}, ...}``) or a bare
    state dict; strips the ``module.`` (DataParallel), ``MAE_encoder.`` and ``base_model.``
    prefixes and drops everything that is not part of the encoder (decoder, mask token,
    optimizer state, …).

    Args:
        state: what ``torch.load`` returned.

    Returns:
        Tensors keyed by this module's parameter and buffer names.
    """
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint holds a {type(state).__name__}, expected a dict")
    inner = state.get("base_model")
    if isinstance(inner, dict):
        state = inner
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if key.startswith(_MODEL_PARTS):
            mapped[key] = value
    return mapped


def _required_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]


def load_point_mae(path: str | None, random_init: bool, batchnorm: str) -> PointTransformer:
    """Build the Point-MAE encoder from a checkpoint or, explicitly, random weights.

    Args:
        path: Point-MAE pre-training checkpoint (``{"base_model": ...}`` or a bare state dict),
            loaded with ``torch.load(..., weights_only=True)``; None with ``random_init``.
        random_init: use a random initialization seeded with ``RANDOM_SEED`` (identical in
            every process); the features are then not meaningful.
        batchnorm: ``"sample"`` or ``"running"``.

    Returns:
        The model in eval mode on the CPU, with ``weights_label`` and ``random_weights`` set.

    Raises:
        ValueError: no checkpoint and no explicit random request, both given, a checkpoint
            that cannot be loaded safely, or one that lacks encoder/transformer weights.
        FileNotFoundError: no such checkpoint file.
    """
    if random_init:
        if path is not None:
            raise ValueError("pass either a Point-MAE checkpoint or random_init, not both")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = PointTransformer(batchnorm)
        model.weights_label = f"random-seed{RANDOM_SEED}"
        model.random_weights = True
        return model.eval()
    if path is None:
        raise ValueError(
            "3D features need Point-MAE weights: pass the pre-training checkpoint path, or "
            "request random weights explicitly (results are then not meaningful)"
        )
    content = load_checkpoint(path, "Point-MAE")
    state = map_point_mae_keys(content)
    model = PointTransformer(batchnorm)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"{path}: checkpoint lacks {len(missing)} of the {len(_required_keys(model))} "
            f"Point-MAE encoder/transformer weights, e.g. {missing[:8]}; refusing to run with "
            "random weights in their place"
        )
    model.weights_label = f"sha256-{file_digest(path)[:16]}"
    return model.eval()


class PointFeatureExtractor:
    """Multi-layer group tokens of the Point-MAE encoder.

    Attributes:
        model: the point transformer, in eval mode.
        identity: backbone identity for cache keys and reports, e.g.
            ``"point_mae:sha256-<16 hex>"`` or ``"point_mae:random-seed0"``.
        random_weights: True when the weights are a random initialization (results are then
            not meaningful and every output must say so).
    """

    def __init__(self, model: PointTransformer, weights: str | None = None) -> None:
        """Wrap a model built by :func:`load_point_mae`.

        Args:
            model: the point transformer.
            weights: the weight source the model was built from (checkpoint path or
                ``"random"``); only consulted when the model carries no ``weights_label``.
        """
        self.model = model.eval()
        label = getattr(model, "weights_label", "unset")
        random_weights = bool(getattr(model, "random_weights", False))
        if label == "unset":
            if weights == "random":
                label, random_weights = f"random-seed{RANDOM_SEED}", True
            elif weights is not None and Path(weights).is_file():
                label = f"sha256-{file_digest(weights)[:16]}"
            else:
                label = "unknown"
        self.random_weights = random_weights
        self.identity = f"point_mae:{label}"

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def extract(
        self, points: torch.Tensor, grouping: Grouping, layers: Sequence[int]
    ) -> list[torch.Tensor]:
        """Group tokens of one sample.

        Args:
            points: (P, 3) the sample's (unit-sphere normalized) foreground points.
            grouping: its groups (centres and members index ``points``).
            layers: 1-based block numbers, e.g. (4, 8, 12).

        Returns:
            One (G, C) float32 tensor per layer, on the model's device (inputs elsewhere are
            moved there).
        """
        device = self.device
        points = points.to(device=device, dtype=torch.float32)
        members = grouping.members.to(device)
        centres = grouping.centres.to(device=device, dtype=torch.float32)
        neighbourhood = points[members] - centres.unsqueeze(1)  # (G, K, 3)
        tokens = self.model.forward_intermediates(
            neighbourhood.unsqueeze(0), centres.unsqueeze(0), layers
        )
        return [t[0].float() for t in tokens]

    def to(self, device: torch.device | str) -> PointFeatureExtractor:
        """Move the model to a device; returns self."""
        self.model.to(device)
        return self
