"""Comparing two sets of CO-SVD triplets (fast against exact, ours against PEFT's): values,
subspaces, products and the energy criterion; triplets recovered from adapters."""

from __future__ import annotations

import torch


def principal_cosines(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of ``A`` and ``B`` ``(d, r)``, ascending."""
    Qa = torch.linalg.qr(A.double()).Q
    Qb = torch.linalg.qr(B.double()).Q
    return torch.linalg.svdvals(Qa.transpose(-1, -2) @ Qb).clamp(max=1.0).flip(-1)


def compare_triplets(
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    W: torch.Tensor | None = None,
    C_fix: torch.Tensor | None = None,
    which: str = "top",
) -> dict[str, float]:
    """How close the triplets ``test = (U, S, V)`` are to ``ref`` (same rank, one layer).

    ``U`` ``(m, r)``, ``S`` ``(r,)``, ``V`` ``(n, r)``. Reports the largest relative singular
    value error, the smallest principal cosine of the ``U`` and ``V`` subspaces, and the
    relative difference of the products ``U diag(S) Vᵀ`` (the adapters' ``s·B·A``). With ``W``
    ``(m, n)`` and ``C_fix`` ``(n, n)`` it also gives the energy criterion: for ``top``
    ``‖M − P_U M‖_F / ‖M − P_ref M‖_F − 1`` (``M = W·C_fix``), for ``bottom``
    ``‖U_testᵀ M‖_F / ‖U_refᵀ M‖_F − 1`` (≥ 0 up to rounding when ``ref`` is exact).
    """
    Ut, St, Vt = (x.double() for x in test)
    Ur, Sr, Vr = (x.double() for x in ref)
    if St.shape != Sr.shape:
        raise ValueError(f"compare_triplets: ranks differ ({tuple(St.shape)} vs {tuple(Sr.shape)})")
    out = {
        "sv_rel_err": float(((St - Sr).abs() / Sr.abs()).max()),
        "u_cos_min": float(principal_cosines(Ut, Ur)[0]),
        "v_cos_min": float(principal_cosines(Vt, Vr)[0]),
    }
    prod_t = (Ut * St) @ Vt.T
    prod_r = (Ur * Sr) @ Vr.T
    out["product_rel_err"] = float((prod_t - prod_r).norm() / prod_r.norm())
    if W is not None and C_fix is not None:
        M = W.double() @ C_fix.double()
        Qt = torch.linalg.qr(Ut).Q
        Qr = torch.linalg.qr(Ur).Q
        cap_t = (Qt.T @ M).norm() ** 2
        cap_r = (Qr.T @ M).norm() ** 2
        if which == "top":
            total = M.norm() ** 2
            out["energy_rel_excess"] = float(((total - cap_t).clamp_min(0) / (total - cap_r)).sqrt() - 1)
        else:
            out["energy_rel_excess"] = float((cap_t / cap_r).sqrt() - 1)
    return out


def triplets_from_adapter(
    A: torch.Tensor, B: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover ``(U, S, V)`` from CorDA adapters ``A`` ``(r, n)``, ``B`` ``(m, r)`` (docs/design.md §4).

    ``B = U diag(√(S/s))`` with unit columns ``U``, so ``S_i = s·‖B_i‖²``, ``U_i = B_i/‖B_i‖`` and
    ``V_i = A_iᵀ/‖B_i‖``. Returns float64 ``U`` ``(m, r)``, ``S`` ``(r,)``, ``V`` ``(n, r)``.
    """
    B64 = B.double()
    norms = B64.norm(dim=0)
    return B64 / norms, scaling * norms**2, A.double().T / norms
