"""Exit heads: the Bag-of-Features head of Passalis et al. (METHODS.md §1) and a
pooling + linear baseline.

Every head maps a feature map [B, D, H, W] to logits [B, C]. BoF heads also expose
`histogram(x)` so hierarchical exits can add histograms along depth and share one
classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Literal["logistic", "rbf"]
Spatial = Literal["global", "2x2"]


@dataclass(frozen=True, kw_only=True)
class BoFConfig:
    """Shape of a BoF exit head."""

    codewords: int = 64  # N_K in the paper
    kernel: Kernel = "logistic"  # logistic kernel + L1 (paper), or RBF + softmax
    spatial: Spatial = "global"  # one histogram, or one per cell of a 2x2 grid
    # Average-pool the map to at most this side before the codebook. A 1x1 codebook on a
    # 32x32 map costs as much as a slice of a residual block; the histogram is a spatial
    # average anyway, so a coarser grid keeps the exit cheap. None keeps full resolution.
    pool_to: int | None = 8
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.codewords < 2:
            raise ValueError(f"codewords must be >= 2, got {self.codewords}")
        if self.kernel not in ("logistic", "rbf"):
            raise ValueError(f"kernel must be 'logistic' or 'rbf', got {self.kernel!r}")
        if self.spatial not in ("global", "2x2"):
            raise ValueError(f"spatial must be 'global' or '2x2', got {self.spatial!r}")
        if self.pool_to is not None and self.pool_to < 2:
            raise ValueError(f"pool_to must be >= 2 or None, got {self.pool_to}")

    @property
    def histogram_dim(self) -> int:
        return self.codewords * (4 if self.spatial == "2x2" else 1)


def _pool_sum(x: torch.Tensor, size: int | None) -> tuple[torch.Tensor, float]:
    """Average-pool a map [B, D, H, W] down to side `size` as (sums, 1 / cells), so the
    caller can fold the 1 / cells into its next linear op. Halving by strided slices is
    several times faster on CPU than the pooling kernels for these small maps (e.g. 17 vs
    115 us for [8, 32, 16, 16] at 1 thread); other shapes fall back to adaptive average
    pooling."""
    h, w = x.shape[-2:]
    if size is None or max(h, w) <= size:
        return x, 1.0
    fh, fw = h // size, w // size
    if h % size or w % size or fh != fw or fh & (fh - 1):
        return F.adaptive_avg_pool2d(x, size), 1.0
    if fh > 2 and x.numel() <= 1 << 14:  # one image, 4x4 cells: one pooling call beats four slices
        return F.avg_pool2d(x, fh), 1.0
    factor = fh
    while factor > 1:
        x = x[..., 0::2, :] + x[..., 1::2, :]
        x = x[..., 0::2] + x[..., 1::2]
        factor //= 2
    return x, 1.0 / (fh * fw)


class BoFHistogram(nn.Module):
    """Feature map -> soft codeword histogram [B, histogram_dim] (rows sum to 1 per cell)."""

    def __init__(self, in_channels: int, config: BoFConfig) -> None:
        super().__init__()
        self.config = config
        # The codebook is a 1x1 convolution: similarity of each position to each codeword.
        self.codebook = nn.Conv2d(in_channels, config.codewords, kernel_size=1, bias=config.kernel == "logistic")
        self._cache: tuple | None = None  # folded codebook for inference (see _folded)
        if config.kernel == "logistic":
            self.a = nn.Parameter(torch.ones(()))  # kernel slope
            self.c = nn.Parameter(torch.zeros(()))  # kernel offset
        else:
            # log of the RBF width; learnable so the softmax sharpness adapts per exit
            self.log_sigma = nn.Parameter(torch.zeros(()))

    def membership(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position soft assignment u [B, N_K, H', W'], summing to 1 over codewords."""
        cfg = self.config
        x, scale = _pool_sum(x, cfg.pool_to)  # x * scale is the average-pooled map
        b, d, h, w = x.shape
        if cfg.kernel == "logistic":
            # (tanh(a·s + c) + 1) / 2 == sigmoid(2a·s + 2c), and s = W·(x·scale) + bias: fold the
            # scalars into the codebook so the map sees one matmul, one add and one sigmoid
            # (tanh is ~6x slower than sigmoid on CPU, and 1x1 convs on tiny maps pay for mkldnn)
            weight, bias = self._folded(scale)
            s = torch.sigmoid(torch.matmul(weight, x.flatten(2)) + bias)  # [B, N_K, HW]
            u = s / (s.sum(dim=1, keepdim=True) + cfg.eps)
            return u.view(b, -1, h, w)
        x = x * scale
        w_ = self.codebook.weight  # [N_K, D, 1, 1]
        dot = self.codebook(x)
        sq_dist = (x * x).sum(dim=1, keepdim=True) - 2 * dot + (w_ * w_).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        return torch.softmax(-sq_dist / (2 * torch.exp(2 * self.log_sigma)), dim=1)

    def _folded(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook weight [N_K, D] and bias [N_K, 1] with the kernel's scalars and the pooling
        scale folded in. Cached outside training (keyed by the parameters' versions, which
        every in-place update such as an optimizer step or load_state_dict bumps): at batch 1
        the handful of tiny ops that fold them would cost as much as the head itself."""
        codebook_bias = self.codebook.bias
        assert codebook_bias is not None, "the logistic kernel's codebook has a bias"
        params = (self.codebook.weight, codebook_bias, self.a, self.c)
        key = (scale, *(p._version for p in params))
        if not (self.training or torch.is_grad_enabled()) and self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        weight = self.codebook.weight.flatten(1) * (2 * self.a * scale)
        bias = (2 * (self.a * codebook_bias + self.c))[:, None]
        if not (self.training or torch.is_grad_enabled()):
            self._cache = (key, weight, bias)
        return weight, bias

    def train(self, mode: bool = True) -> "BoFHistogram":
        # Also dropped at every switch of mode: not every in-place update bumps a version
        # (torch's fused SGD on CPU does not), and training always ends in a switch to eval.
        self._cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # the histogram in fp32 under mixed precision: its entries differ by ~1e-3 around
            # 1/N_K, about bfloat16's resolution there, and the head is a small share of a step
            with torch.autocast(x.device.type, enabled=False):
                return self._histogram(x.float())
        return self._histogram(x)

    def _histogram(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.spatial == "global" and self.config.kernel == "logistic":
            return self._global_logistic(x)
        u = self.membership(x)
        if self.config.spatial == "2x2":
            return F.adaptive_avg_pool2d(u, 2).flatten(1)  # [B, N_K * 4]
        return u.flatten(2).mean(-1)  # [B, N_K]

    def _global_logistic(self, x: torch.Tensor) -> torch.Tensor:
        """`membership(x)` averaged over positions without materializing it: the head
        is a few passes over [B, N_K, H'W'] and each one shows at the batch sizes the
        edge runs (the bias in the batched matmul, the per-position normalization and the
        mean in one batched product: the four reference heads about 10% faster at batch 8-64).
        At small batches every op costs a few microseconds whatever its size, so there are
        as few as the math allows."""
        x, scale = _pool_sum(x, self.config.pool_to)
        b, _, h, w = x.shape
        weight, bias = self._folded(scale)
        # In place, no second buffer per pass; autograd allows it: matmul's, add's and sum's
        # gradients do not need their outputs, sigmoid's and reciprocal's need only theirs.
        # The codebook broadcast over the batch in one matmul beats baddbmm on an expanded one.
        s = torch.matmul(weight, x.flatten(2)).add_(bias).sigmoid_()  # [B, N_K, HW]
        inverse_mass = s.sum(dim=1, keepdim=True).add_(self.config.eps).mul_(h * w).reciprocal_()  # [B, 1, HW]
        return torch.matmul(s, inverse_mass.mT).view(b, -1)  # sum over positions of u / HW

    @torch.no_grad()
    def init_codebook(self, features: torch.Tensor, *, max_vectors: int = 20000, seed: int = 0) -> None:
        """Set the codewords to k-means centres of feature vectors [B, D, H, W] (RBF init)."""
        from sklearn.cluster import KMeans  # only needed here; keeps import light

        cfg = self.config
        features, scale = _pool_sum(features, cfg.pool_to)
        features = features * scale
        vectors = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        generator = torch.Generator().manual_seed(seed)
        if len(vectors) > max_vectors:
            vectors = vectors[torch.randperm(len(vectors), generator=generator)[:max_vectors]]
        kmeans = KMeans(n_clusters=cfg.codewords, n_init=1, random_state=seed).fit(vectors.double().numpy())
        centres = torch.as_tensor(kmeans.cluster_centers_, dtype=self.codebook.weight.dtype)
        self.codebook.weight.copy_(centres.view_as(self.codebook.weight))
        if cfg.kernel == "rbf":
            # width: typical distance of a vector to its centre
            self.log_sigma.fill_(0.5 * float(torch.log(torch.tensor(kmeans.inertia_ / len(vectors) + cfg.eps))))


class HistogramClassifier(nn.Linear):
    """Linear classifier on a histogram, scaled so entries average 1 instead of 1/N_K (global).

    The scale is a reparametrization (same function class as the paper's linear layer),
    but without it SGD with weight decay cannot grow weights large enough to separate
    histograms whose entries differ by ~1e-3, and the exits never leave chance level.
    """

    def __init__(self, config: BoFConfig, num_classes: int) -> None:
        super().__init__(config.histogram_dim, num_classes)
        # A 2x2 histogram is four cells that each sum to 1: scaled by sqrt(4) less, its vector
        # has a global one's norm, so SGD moves the classifier (and the codebook under it) as
        # fast. At the full scale the reference recipe (peak lr 0.2) diverged in 4 epochs.
        cells = config.histogram_dim // config.codewords
        self.scale = config.codewords / math.sqrt(cells)

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        # W·(scale·h) + b as one op (addmm's alpha), not a scaled copy and then the linear
        return torch.addmm(self.bias, hist, self.weight.t(), alpha=self.scale)


class BoFHead(nn.Module):
    """BoF exit: histogram of soft codeword assignments -> linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, config: BoFConfig | None = None) -> None:
        super().__init__()
        self.config = config or BoFConfig()
        self.bof = BoFHistogram(in_channels, self.config)
        self.fc = HistogramClassifier(self.config, num_classes)

    def histogram(self, x: torch.Tensor) -> torch.Tensor:
        return self.bof(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bof(x))


class PoolLinearHead(nn.Module):
    """Baseline exit: global average pooling and one linear layer."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
