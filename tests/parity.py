"""Helpers for parity tests against the PyTorch reference (imported by the test modules)."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter of a reference model random, non-trivial values, in place.

    Layers that default to zero (output projections, learned embeddings, clip_mean/std) become
    non-zero; weights are scaled by 1/sqrt(fan_in) so activations stay O(1) (unsaturated outputs).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf == "weight" and "embedding" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and leaf == "weight":  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "std" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:  # embeddings, positional tables, clip_mean, learned tokens
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def assert_close(actual, expected, tol: float = 1e-4, what: str = "output") -> float:
    """max |actual - expected| <= tol * max(1, max |expected|); returns the error."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    err = float(np.max(np.abs(a - e))) if a.size else 0.0
    bound = tol * max(1.0, float(np.max(np.abs(e))) if e.size else 0.0)
    assert err <= bound, f"{what}: max |jax - torch| = {err:.3g} > {bound:.3g}"
    return err


def nchw(x) -> torch.Tensor:
    """NHWC numpy/jax -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return to_numpy(x).transpose(0, 2, 3, 1)
