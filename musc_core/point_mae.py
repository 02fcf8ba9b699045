"""3D group features from the Point-MAE point transformer (paper §III-A).

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
from typing import NamedTuple

import torch
from torch import nn

from musc_core.attention import attention
from musc_core.checkpoints import RANDOM_SEED, file_digest, load_checkpoint
from musc_core.config import BATCHNORM_MODES
from musc_core.grouping import Grouping

WIDTH = 384
DEPTH = 12
HEADS = 6
MLP_RATIO = 4
_PREFIXES = ("module.", "MAE_encoder.", "base_model.")
_MODEL_PARTS = ("encoder.", "pos_embed.", "blocks.", "norm.")
# Points per chunk of the mini-PointNet: its (chunk, 512) float32 rows take 8 MB.
_ENCODER_CHUNK_POINTS = 4096


class _Affine(NamedTuple):
    """Per-channel ``x · scale + shift`` (a BatchNorm folded with what precedes it)."""

    scale: torch.Tensor
    shift: torch.Tensor


class _Products(NamedTuple):
    """The encoder's weight matrices as (out, in) GEMM operands, in the compute dtype."""

    second: torch.Tensor  # conv 128→256
    third_local: torch.Tensor  # conv 512→512, the half that sees each point's features
    third_global: torch.Tensor  # conv 512→512, the half that sees the group maximum
    fourth: torch.Tensor  # conv 512→C


class _Moments:
    """Per-channel mean and biased variance of rows added chunk by chunk (Chan et al.).

    Each chunk contributes its own mean and centred sum of squares, merged exactly; this is as
    accurate as a two-pass computation and reads each chunk while it is still in cache.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Add (n, C) rows."""
        n = rows.shape[0]
        mean = rows.mean(dim=0)
        m2 = (rows - mean).square_().sum(dim=0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        """Biased variance (divisor = number of rows)."""
        if self.m2 is None:
            raise ValueError("no rows were added")
        return self.m2 / self.count


def _normalization(
    norm: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, offset: torch.Tensor
) -> _Affine:
    """BatchNorm with the given statistics applied to ``x + offset``, as ``x · scale + shift``."""
    scale = torch.rsqrt(var + norm.eps) * norm.weight
    return _Affine(scale, norm.bias + (offset - mean) * scale)


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` when it is a GEMM dtype Point-MAE runs in (float32, bfloat16), else an error."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"Point-MAE computes in float32 or bfloat16, not {dtype}")
    return dtype


class Encoder(nn.Module):
    """Mini-PointNet: one token per group of points.

    ``first_conv`` (Conv1d 3→128, BatchNorm, ReLU, Conv1d 128→256) runs on every point; the
    per-group max is concatenated to every point's features (global first, 512 channels);
    ``second_conv`` (Conv1d 512→512, BatchNorm, ReLU, Conv1d 512→384) runs on every point and
    the per-group max is the token.

    Evaluation (same function, fewer passes over memory): the 1-wide convolutions are matrix
    products on channels-last rows, the global half of the 512→512 product runs once per
    group, and every bias before a BatchNorm is folded into that BatchNorm's shift (a
    per-channel constant only moves the mean; the bias of the last product is added after the
    max-pool). The first BatchNorm's statistics follow exactly from the mean and covariance of
    the input coordinates (the first product is linear in them), so it becomes a scaled first
    product. The rows are processed in chunks of groups that stay in cache; with per-sample
    statistics, the 512-channel activations of one sample are kept in a buffer (shared by the
    samples of a batch) until their statistics are complete.

    Autocast does not reach the encoder. With ``dtype=torch.bfloat16`` the three wide products
    (128→256, 512→512, 512→C) round their operands and their result to bfloat16 and accumulate
    in float32; the 3→128 product, the BatchNorm statistics, the normalization and the
    max-pools stay float32. Because the biases are folded after the statistics, what is
    rounded is the variation of a channel, not the bias it varies around.
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

    def _first_affine(self, points: torch.Tensor, mode: str) -> _Affine:
        """BatchNorm 1 folded with the first product: ``relu(p @ W1ᵀ · scale + shift)``.

        With per-sample statistics, y = W1 p + b1 has mean W1 μ + b1 and per-channel variance
        w_c Σ w_cᵀ, with μ and Σ the mean and (biased) covariance of the sample's coordinates,
        computed in float64.
        """
        conv, norm = self.first_conv[0], self.first_conv[1]
        weight = conv.weight[:, :, 0]
        if mode == "running":
            return _normalization(norm, norm.running_mean, norm.running_var, conv.bias)
        coords = points.reshape(-1, 3).double()
        mu = coords.mean(dim=0)
        centred = coords - mu
        cov = centred.T @ centred / coords.shape[0]
        w64 = weight.double()
        mean = (w64 @ mu).float()
        var = ((w64 @ cov) * w64).sum(dim=1).float()
        return _normalization(norm, mean, var, torch.zeros_like(mean))

    def _products(self, dtype: torch.dtype) -> _Products:
        """The wide products' weights in ``dtype`` (views when it is float32)."""
        weight3 = self.second_conv[0].weight[:, :, 0]
        half = self.first_conv[3].out_channels
        return _Products(
            self.first_conv[3].weight[:, :, 0].to(dtype),
            weight3[:, half:].to(dtype),
            weight3[:, :half].to(dtype),
            self.second_conv[3].weight[:, :, 0].to(dtype),
        )

    def _local(
        self, points: torch.Tensor, first: _Affine, products: _Products, bn2_input: torch.Tensor
    ) -> None:
        """Write the second BatchNorm's input (without its constant offset) for a chunk.

        Args:
            points: (g, K, 3) coordinates of a chunk of groups.
            first: the folded first BatchNorm.
            products: the wide products' weights (their dtype is the GEMM dtype).
            bn2_input: (g·K, 512) float32 output rows.
        """
        g, k, _ = points.shape
        dtype = products.second.dtype
        weight1 = self.first_conv[0].weight[:, :, 0] * first.scale[:, None]
        hidden = torch.addmm(first.shift, points.reshape(-1, 3), weight1.T).relu_()
        local = torch.mm(hidden.to(dtype), products.second.T)  # (g·K, 256), bias folded later
        pooled = local.view(g, k, -1).amax(dim=1)
        if dtype == torch.float32:
            torch.mm(local, products.third_local.T, out=bn2_input)
        else:
            bn2_input.copy_(torch.mm(local, products.third_local.T))
        per_group = torch.mm(pooled, products.third_global.T).float()
        bn2_input.view(g, k, -1).add_(per_group.unsqueeze(1))

    def _second_offset(self) -> torch.Tensor:
        """(512,) constant the folded biases add to the second BatchNorm's input."""
        conv2, conv3 = self.first_conv[3], self.second_conv[0]
        weight3 = conv3.weight[:, :, 0]
        # local and its group max both carry conv2's bias; conv3 sees it on both halves.
        return weight3 @ torch.cat([conv2.bias, conv2.bias]) + conv3.bias

    def _tokens(
        self, rows: torch.Tensor, second: _Affine, products: _Products, groups: int
    ) -> torch.Tensor:
        """Second BatchNorm, ReLU, last product and max-pool of a chunk: (g, C), no bias."""
        hidden = torch.addcmul(second.shift, rows, second.scale, out=rows).relu_()
        out = torch.mm(hidden.to(products.fourth.dtype), products.fourth.T)
        return out.view(groups, -1, out.shape[-1]).amax(dim=1)

    def _encode(
        self,
        points: torch.Tensor,
        mode: str,
        buffer: torch.Tensor | None,
        products: _Products,
    ) -> torch.Tensor:
        """Tokens of one sample's (G, K, 3) groups: (G, C) float32."""
        g, k, _ = points.shape
        width = self.second_conv[0].out_channels
        step = max(1, _ENCODER_CHUNK_POINTS // k)
        first = self._first_affine(points, mode)
        offset = self._second_offset()
        tokens = points.new_empty((g, self.channels))
        if mode == "running":
            norm = self.second_conv[1]
            second = _normalization(norm, norm.running_mean, norm.running_var, offset)
            rows = points.new_empty((min(step, g) * k, width))
            for start in range(0, g, step):
                chunk = points[start : start + step]
                part = rows[: chunk.shape[0] * k]
                self._local(chunk, first, products, part)
                tokens[start : start + step] = self._tokens(part, second, products, chunk.shape[0])
            return tokens + self.second_conv[3].bias
        if buffer is None:
            raise ValueError("per-sample statistics need a (G·K, 512) buffer")
        moments = _Moments()
        for start in range(0, g, step):
            chunk = points[start : start + step]
            part = buffer[start * k : (start + chunk.shape[0]) * k]
            self._local(chunk, first, products, part)
            moments.add(part)
        # With the sample's own statistics the constant offset cancels out.
        mean = moments.mean
        second = _normalization(self.second_conv[1], mean, moments.variance(), mean.new_zeros(()))
        for start in range(0, g, step):
            size = min(step, g - start)
            part = buffer[start * k : (start + size) * k]
            tokens[start : start + size] = self._tokens(part, second, products, size)
        return tokens + self.second_conv[3].bias

    def forward(
        self, groups: torch.Tensor, batchnorm: str = "sample", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Tokens of point groups.

        Args:
            groups: (B, G, K, 3) point coordinates relative to their group centre.
            batchnorm: ``"sample"`` (each sample's own statistics) or ``"running"``.
            dtype: GEMM dtype of the wide products, float32 or bfloat16.

        Returns:
            (B, G, C) group tokens, float32.
        """
        batch, g, k, _ = groups.shape
        with torch.autocast(groups.device.type, enabled=False):
            groups = groups.float()
            products = self._products(_gemm_dtype(dtype))
            width = self.second_conv[0].out_channels
            buffer = groups.new_empty((g * k, width)) if batchnorm == "sample" else None
            return torch.stack(
                [self._encode(groups[i], batchnorm, buffer, products) for i in range(batch)]
            )


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
        out = attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
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
        self,
        neighbourhood: torch.Tensor,
        centres: torch.Tensor,
        indices: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Group tokens after the given blocks, each through the final LayerNorm.

        The centre's positional embedding is added to the tokens before every block:
        ``x = block(x + pos)``. With ``dtype=torch.bfloat16`` the encoder's wide products
        (see :class:`Encoder`) and the blocks' linear layers and attention run in bfloat16
        (autocast); the positional embedding, LayerNorms and the residual stream stay float32.

        Args:
            neighbourhood: (B, G, K, 3) group members relative to their centre.
            centres: (B, G, 3) group centres.
            indices: 1-based block numbers, e.g. (4, 8, 12).
            dtype: GEMM dtype, float32 or bfloat16.

        Returns:
            One (B, G, C) float32 tensor per requested block, in the order asked.
        """
        wanted = [int(i) for i in indices]
        if not wanted or min(wanted) < 1 or max(wanted) > self.depth:
            raise ValueError(f"block numbers must be in [1, {self.depth}], got {tuple(indices)}")
        dtype = _gemm_dtype(dtype)
        device = neighbourhood.device.type
        with torch.autocast(device, enabled=False):
            x = self.encoder(neighbourhood, self.batchnorm, dtype)
            pos = self.pos_embed(centres.float())
        outputs: dict[int, torch.Tensor] = {}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            for number, block in enumerate(self.blocks.blocks[: max(wanted)], start=1):
                x = block(x + pos)
                if number in wanted:
                    outputs[number] = self.norm(x)
        return [outputs[i].float() for i in wanted]


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
        self,
        points: torch.Tensor,
        grouping: Grouping,
        layers: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Group tokens of one sample.

        Args:
            points: (P, 3) the sample's (unit-sphere normalized) foreground points.
            grouping: its groups (centres and members index ``points``).
            layers: 1-based block numbers, e.g. (4, 8, 12).
            dtype: GEMM dtype, float32 or bfloat16 (see
                :meth:`PointTransformer.forward_intermediates`).

        Returns:
            One (G, C) float32 tensor per layer, on the model's device (inputs elsewhere are
            moved there).
        """
        return [t[0] for t in self.extract_many([points], [grouping], layers, dtype)]

    @torch.inference_mode()
    def extract_many(
        self,
        points: Sequence[torch.Tensor],
        groupings: Sequence[Grouping],
        layers: Sequence[int],
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Group tokens of several samples in one forward pass.

        The same as :meth:`extract` per sample (BatchNorm statistics stay per sample), but the
        encoder's working buffer is shared by the samples and the transformer multiplies the
        tokens of all samples together: on the CPU a batch of a few samples is faster per
        sample than one at a time.

        Args:
            points: B tensors (P_b, 3), the samples' foreground points (P_b may differ).
            groupings: their groups, all with the same G and K.
            layers: 1-based block numbers, e.g. (4, 8, 12).
            dtype: GEMM dtype, float32 or bfloat16.

        Returns:
            One (B, G, C) float32 tensor per layer, on the model's device.
        """
        if len(points) != len(groupings) or not points:
            raise ValueError(f"{len(points)} point sets for {len(groupings)} groupings")
        device = self.device
        neighbourhoods, centres = [], []
        for sample_points, grouping in zip(points, groupings, strict=True):
            sample_points = sample_points.to(device=device, dtype=torch.float32)
            sample_centres = grouping.centres.to(device=device, dtype=torch.float32)
            members = grouping.members.to(device)
            neighbourhoods.append(sample_points[members] - sample_centres.unsqueeze(1))
            centres.append(sample_centres)
        shapes = {tuple(n.shape) for n in neighbourhoods}
        if len(shapes) != 1:
            raise ValueError(f"samples must share G and K to be batched, got {sorted(shapes)}")
        return self.model.forward_intermediates(
            torch.stack(neighbourhoods), torch.stack(centres), layers, dtype
        )

    def to(self, device: torch.device | str) -> PointFeatureExtractor:
        """Move the model to a device; returns self."""
        self.model.to(device)
        return self
