"""The kernel benchmark's FLOP counting: what runs, counted once, attention products included."""

import torch
import torch.nn.functional as F

from benchmarks.bench_kernels import attention_flops, count_flops
from musc_core.features_2d import ViTFeatureExtractor


def test_cpu_attention_counts_its_two_products():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 10, 64, generator=generator)
    k = torch.randn(2, 3, 12, 64, generator=generator)
    v = torch.randn(2, 3, 12, 32, generator=generator)
    fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    explicit = count_flops(lambda: ((q @ k.transpose(-2, -1)) / 8.0).softmax(-1) @ v)
    # q kᵀ: 2·(2·3)·10·12·64 = 92,160; (·) v: 2·(2·3)·10·12·32 = 46,080.
    assert fused == explicit == 92_160 + 46_080
    assert attention_flops(q.shape, k.shape, v.shape) == fused


def test_routed_vit_counts_each_product_once():
    """A tiny ViT's counted FLOPs are the sum of its products, written out layer by layer."""
    extractor = ViTFeatureExtractor.create("vit_tiny_patch16_224", "random", 64, patch_size=8)
    assert extractor.native_attention_layers == 12
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    counted = count_flops(lambda: extractor.extract(images, (4, 8, 12)))
    patches, width, heads, patch = 64, 192, 3, 8
    tokens = patches + 1  # and the class token
    embed = 2 * patches * (3 * patch * patch) * width
    qkv = 2 * tokens * width * 3 * width
    products = heads * 2 * (2 * tokens * tokens * (width // heads))
    proj = 2 * tokens * width * width
    mlp = 2 * (2 * tokens * width * 4 * width)
    assert counted == embed + 12 * (qkv + products + proj + mlp)
