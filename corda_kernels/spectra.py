"""Cheap spectra for CorDA++: values only, no singular vectors, no full SVD per candidate.

What CorDA++ needs per candidate covariance (DESIGN §3.5):

* ``λ_min`` / ``λ_max`` of the damped covariance ``C_fix`` ``(n, n)``: a float64
  ``eigvalsh`` (values only). ``C_fix = C + δ·I`` so they are shared by every layer that reads
  the same input; compute them once per accumulator and candidate.
* ``Σ_j σ_j(W·C_fix)`` and ``σ_max(W·C_fix)`` for ``W`` ``(m, n)``, and the full descending
  spectrum for the rank allocation: the eigenvalues of the *smaller* Gram matrix of
  ``P = W·C_fix`` (``P·Pᵀ`` if ``m ≤ n`` else ``Pᵀ·P``, ``k×k`` with ``k = min(m, n)``), formed
  and decomposed in float64; ``σ_j = √max(μ_j, 0)``.

Error of the Gram path (the default, ``method="gram"``). Weyl's bound for the symmetric
eigensolver on the float64 Gram gives ``|σ_j² − σ̃_j²| ≤ c·k·ε₆₄·σ_max²`` (``ε₆₄ ≈ 1.1e-16``,
``c`` a small constant including the rounding of forming the Gram), hence an *absolute* error
``|σ_j − σ̃_j| ≤ √(c·k·ε₆₄)·σ_max ≈ 1e-7·σ_max`` at worst for ``k`` up to a few thousand, and a
relative error ``≈ c·k·ε₆₄·(σ_max/σ_j)²/2`` for the large ones. So ``σ_max`` and ``Σσ`` are
correct to ~1e-12 relative in practice (``Σσ ≥ σ_max`` bounds the summed absolute error by
``k·1e-7`` relative in the very worst case; tests check ≤ 1e-9 against float64 ``svdvals`` on
spectra spanning 8 decades), while singular values below ``~1e-7·σ_max`` are only resolved
to that absolute level. ``method="svd"`` (float64 ``svdvals`` of ``P``, absolute error
``~k·ε₆₄·σ_max``) is there when the very bottom must be exact; it costs a few times more.
Inputs of any float dtype are promoted to float64; outputs are float64 tensors on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPECTRUM_METHODS = ("gram", "svd")


@dataclass
class CandidateSpectrum:
    """Values of one layer under one candidate covariance (all float64 Python numbers / tensors).

    ``sigma`` is the descending spectrum of ``W·C_fix`` ``(k,)`` float64 on the CPU, or ``None``
    if it was not kept.
    """

    lam_min: float
    lam_max: float
    sigma_sum: float
    sigma_max: float
    m: int
    sigma: torch.Tensor | None = None

    @property
    def compactness(self) -> float:
        """``π(C_fix) = √(m·λ_max) / λ_min``."""
        return compactness(self.lam_min, self.lam_max, self.m)

    @property
    def score(self) -> float:
        """The selection score ``log π(C_fix) · Σσ / σ_max`` (lower is better)."""
        return math.log(self.compactness) * self.sigma_sum / self.sigma_max


def compactness(lam_min: float, lam_max: float, m: int) -> float:
    """``π(C) = √(m·λ_max(C)) / λ_min(C)`` for a layer with ``m`` outputs; ``λ_min > 0`` required."""
    if not lam_min > 0:
        raise ValueError(f"compactness: λ_min must be positive (use the damped covariance), got {lam_min}")
    return math.sqrt(m * lam_max) / lam_min


def eig_extremes(C_fix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ_min, λ_max)`` of symmetric ``C_fix`` ``(n, n)`` or ``(B, n, n)``: float64 ``()`` / ``(B,)`` on the CPU."""
    if C_fix.dim() not in (2, 3) or C_fix.shape[-1] != C_fix.shape[-2]:
        raise ValueError(f"eig_extremes: C_fix must be (n, n) or (B, n, n), got {tuple(C_fix.shape)}")
    ev = torch.linalg.eigvalsh(C_fix.to(torch.float64))
    return ev[..., 0].cpu(), ev[..., -1].cpu()


def singular_values(W: torch.Tensor, C_fix: torch.Tensor, *, method: str = "gram") -> torch.Tensor:
    """Descending singular values of ``W·C_fix`` (``W`` ``(m, n)`` or ``(B, m, n)``; ``C_fix``
    ``(n, n)`` or ``(B, n, n)``): float64 ``(k,)`` / ``(B, k)`` on the CPU, ``k = min(m, n)``.

    ``method="gram"``: float64 eigenvalues of the smaller Gram (see the module docstring for
    its error); ``"svd"``: float64 ``svdvals``.
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"singular_values: method must be one of {SPECTRUM_METHODS}, got {method!r}")
    if W.shape[-1] != C_fix.shape[-1] or C_fix.shape[-1] != C_fix.shape[-2]:
        raise ValueError(f"singular_values: W {tuple(W.shape)} and C_fix {tuple(C_fix.shape)} do not match")
    P = W.to(torch.float64) @ C_fix.to(torch.float64)
    if method == "svd":
        return torch.linalg.svdvals(P).cpu()
    m, n = P.shape[-2:]
    G = P @ P.transpose(-1, -2) if m <= n else P.transpose(-1, -2) @ P
    mu = torch.linalg.eigvalsh(G)  # ascending
    return mu.clamp_min(0).sqrt().flip(-1).cpu()


def candidate_spectrum(
    W: torch.Tensor,
    C_fix: torch.Tensor,
    *,
    extremes: tuple[float, float] | None = None,
    keep_sigma: bool = True,
    method: str = "gram",
) -> CandidateSpectrum:
    """Everything CorDA++ needs about layer ``W`` ``(m, n)`` under one damped covariance ``C_fix`` ``(n, n)``.

    ``extremes`` = precomputed ``(λ_min, λ_max)`` of ``C_fix`` (shared by the layers of one input).
    """
    if extremes is None:
        lo, hi = eig_extremes(C_fix)
        extremes = (float(lo), float(hi))
    sigma = singular_values(W, C_fix, method=method)
    return CandidateSpectrum(
        lam_min=float(extremes[0]),
        lam_max=float(extremes[1]),
        sigma_sum=float(sigma.sum()),
        sigma_max=float(sigma[0]),
        m=int(W.shape[0]),
        sigma=sigma if keep_sigma else None,
    )
