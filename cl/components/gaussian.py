"""Gaussian class statistics in feature space: accumulate, reduce across ranks, factor, store compactly, sample.

Used by SLCA's classifier alignment (Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023) and by any method that replays pseudo-features from class Gaussians.

* :class:`ClassMoments` accumulates per class ``n``, ``Σx`` and ``Σxxᵀ`` in float64. Sums (not means) are what
  ranks exchange: ``moments.all_reduce(ctx.dist.all_reduce_sum)`` gives every rank the statistics of the whole
  data set, and two halves accumulated separately and added equal the whole accumulated at once.
* :func:`mean_and_covariance` turns sums into the mean and the unbiased covariance (``n - 1``) plus a ridge ``εI``.
* :func:`cholesky_with_jitter` factors a covariance in float64, adding ``jitter·I`` (x10 per retry) only if needed.
* :class:`GaussianBank` stores, per class, the float64 mean and the float32 lower-triangular Cholesky factor packed
  to its ``D(D+1)/2`` entries: 200 classes x 768 features take 0.24 GB instead of 0.94 GB for float64 covariances.
  Sampling ``μ + L z`` with ``z`` from a caller-supplied generator is exactly what
  ``torch.distributions.MultivariateNormal`` does, so ranks sharing a seed draw identical samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["ClassMoments", "GaussianBank", "cholesky_with_jitter", "mean_and_covariance", "pack_tril",
           "unpack_tril"]


class ClassMoments:
    """Per-class sums of a feature stream in float64: counts ``n`` (C,), ``sum`` (C, D), ``outer`` (C, D, D).

    Args:
        n_classes: number of classes tracked (labels ``0..n_classes-1`` relative to ``offset``).
        dim: feature dimension.
        offset: the label of the first tracked class (labels are shifted by it in :meth:`update`).
        device: where the sums live (the features' device avoids copies).
    """

    def __init__(self, n_classes: int, dim: int, offset: int = 0, device: torch.device | str = "cpu") -> None:
        self.offset = offset
        self.n = torch.zeros(n_classes, dtype=torch.float64, device=device)
        self.sum = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(n_classes, dim, dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` (B, D) of any float dtype, ``labels`` (B,) absolute class labels."""
        x = features.detach().to(self.sum.device, torch.float64)
        y = labels.to(self.sum.device).long() - self.offset
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.n)):
            raise ValueError(f"labels outside the tracked classes {self.offset}..{self.offset + len(self.n) - 1}")
        for c in torch.unique(y).tolist():
            xc = x[y == c]  # (n_c, D)
            self.n[c] += len(xc)
            self.sum[c] += xc.sum(0)
            self.outer[c] += xc.T @ xc  # (D, D)

    def add_(self, other: ClassMoments) -> ClassMoments:
        """In-place sum with the moments of another part of the data (what an all-reduce does across ranks)."""
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> ClassMoments:
        """Replace the local sums by their sum over ranks (``reduce_sum`` = ``ctx.dist.all_reduce_sum``)."""
        self.n, self.sum, self.outer = reduce_sum(self.n), reduce_sum(self.sum), reduce_sum(self.outer)
        return self

    def finalize(self, ridge: float) -> tuple[Tensor, Tensor]:
        """Means (C, D) and covariances (C, D, D), float64, covariances unbiased plus ``ridge·I``."""
        return mean_and_covariance(self.n, self.sum, self.outer, ridge)


def mean_and_covariance(n: Tensor, sx: Tensor, sxx: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """μ = Σx / n and Σ = (Σxxᵀ − n μμᵀ) / (n − 1) + ridge·I, batched over classes, in float64.

    A class with a single sample gets the ridge alone as covariance (its sample covariance is undefined).
    """
    if bool((n < 1).any()):
        raise ValueError("a class has no samples; its mean is undefined")
    n, sx, sxx = n.double(), sx.double(), sxx.double()
    mean = sx / n[:, None]
    centred = sxx - n[:, None, None] * mean[:, :, None] * mean[:, None, :]
    cov = centred / (n - 1).clamp_min(1)[:, None, None]
    cov = 0.5 * (cov + cov.transpose(1, 2))  # exact symmetry: the subtraction leaves rounding asymmetries
    eye = torch.eye(sx.shape[1], dtype=torch.float64, device=sx.device)
    return mean, cov + ridge * eye


def cholesky_with_jitter(cov: Tensor, jitter: float = 1e-6, max_tries: int = 6) -> Tensor:
    """Lower Cholesky factors of (C, D, D) or (D, D) covariances, in their dtype (use float64).

    Matrices that fail get ``jitter·I`` added, multiplied by 10 at each retry (at most ``max_tries`` retries).
    With SLCA's ridge of 1e-4 this never triggers in float64; it guards against a larger feature scale.
    """
    single = cov.dim() == 2
    c = cov.unsqueeze(0) if single else cov
    factor, info = torch.linalg.cholesky_ex(c)
    eye = torch.eye(c.shape[-1], dtype=c.dtype, device=c.device)
    eps = jitter
    for _ in range(max_tries):
        bad = info != 0
        if not bool(bad.any()):
            break
        fixed, info_bad = torch.linalg.cholesky_ex(c[bad] + eps * eye)
        factor[bad] = fixed
        info = info.clone()
        info[bad] = info_bad
        eps *= 10
    if bool((info != 0).any()):
        raise ValueError(f"covariance not positive definite even with jitter {eps / 10:g}; check the features")
    return factor[0] if single else factor


def pack_tril(factor: Tensor) -> Tensor:
    """(..., D, D) lower-triangular -> (..., D(D+1)/2), row-major order of ``torch.tril_indices``."""
    d = factor.shape[-1]
    rows, cols = torch.tril_indices(d, d, device=factor.device)
    return factor[..., rows, cols]


def unpack_tril(packed: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`pack_tril`: (..., D(D+1)/2) -> (..., D, D) with zeros above the diagonal."""
    rows, cols = torch.tril_indices(dim, dim, device=packed.device)
    out = packed.new_zeros(*packed.shape[:-1], dim, dim)
    out[..., rows, cols] = packed
    return out


class GaussianBank:
    """Per-class Gaussians: float64 means (C, D), float32 packed Cholesky factors (C, D(D+1)/2), counts (C,).

    Classes are appended in label order (:meth:`add`); class ``k`` of the bank is label ``k``.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.means = torch.zeros(0, dim, dtype=torch.float64)
        self.factors = torch.zeros(0, dim * (dim + 1) // 2, dtype=torch.float32)
        self.counts = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self.means)

    @staticmethod
    def storage_bytes(n_classes: int, dim: int) -> int:
        """Bytes held for ``n_classes`` Gaussians of dimension ``dim`` (means, packed factors, counts)."""
        return n_classes * (dim * 8 + dim * (dim + 1) // 2 * 4 + 8)

    def add(self, means: Tensor, covs: Tensor, counts: Tensor, jitter: float = 1e-6) -> None:
        """Append classes from float64 means (C, D) and covariances (C, D, D); factors in float64, stored float32."""
        factor = cholesky_with_jitter(covs.double(), jitter)
        self.means = torch.cat([self.means, means.detach().double().cpu()])
        self.factors = torch.cat([self.factors, pack_tril(factor).float().cpu()])
        self.counts = torch.cat([self.counts, counts.detach().double().cpu()])

    def factor(self, c: int) -> Tensor:
        """The (D, D) float32 lower Cholesky factor of class ``c``."""
        return unpack_tril(self.factors[c], self.dim)

    def covariance(self, c: int) -> Tensor:
        """Σ_c = L Lᵀ rebuilt in float64 from the stored factor (for checks; sampling needs only L)."""
        f = self.factor(c).double()
        return f @ f.T

    def sample(self, classes: Sequence[int], n_per_class: int, generator: torch.Generator,
               mean_scale: Sequence[float] | None = None, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``n_per_class`` float32 samples from N(s_c·μ_c, Σ_c) for each class, in class order.

        The standard-normal draws come from ``generator`` on the CPU whatever ``device`` is, so every rank (and
        every device type) that shares the generator's seed gets the same draws. ``mean_scale`` holds one factor
        per class (SLCA's mean shrinkage); it is applied to the float64 mean before the cast, as the official code.
        Returns features (len(classes)·n, D) and labels (len(classes)·n,) on ``device``.
        """
        xs, ys = [], []
        for k, c in enumerate(classes):
            mean = self.means[c] * (1.0 if mean_scale is None else float(mean_scale[k]))
            z = torch.randn(n_per_class, self.dim, generator=generator, dtype=torch.float32)
            f = self.factor(c).to(device)
            xs.append(mean.float().to(device) + z.to(device) @ f.T)  # μ + L z for each row z
            ys.append(torch.full((n_per_class,), int(c), dtype=torch.long, device=device))
        return torch.cat(xs), torch.cat(ys)

    # state as plain tensors (checkpoints load with weights_only=True)
    def state_dict(self) -> dict[str, Tensor]:
        return {"means": self.means, "factors": self.factors, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        means, factors = state["means"].double().cpu(), state["factors"].float().cpu()
        if means.shape[1:] != (self.dim,) or factors.shape[1:] != (self.dim * (self.dim + 1) // 2,):
            raise ValueError(f"Gaussian statistics of dimension {means.shape[-1]} do not fit dimension {self.dim}")
        self.means, self.factors, self.counts = means, factors, state["counts"].double().cpu()
