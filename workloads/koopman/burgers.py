"""Viscous Burgers on the periodic unit interval, u_t + u u_x = nu u_xx, pseudo-spectrally.

- Space: real FFT; the quadratic term u^2/2 is formed in physical space and its spectrum
  truncated by the 2/3 rule (no aliasing of the product into the kept modes).
- Time: integrating-factor RK4. Diffusion is integrated exactly through exp(-nu k^2 dt), so
  the step is limited only by advection (CFL), not by the stiff viscous term.
- Initial conditions: the Gaussian random field of the FNO Burgers benchmark,
  N(0, 625 (-Delta + 25 I)^-2), drawn through its Karhunen-Loeve (Fourier) expansion.
- ``cole_hopf_sine``: the exact solution from u0 = sin(2 pi x), the solver's reference.

Decaying high modes underflow into subnormal floats, which are 3-4x slower on x86; the
solver flushes them to zero while it runs (the spec's measurement).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from scipy.special import ive

GRF_SIGMA, GRF_TAU = 25.0, 5.0  # covariance 625 (-Delta + 25 I)^-2, as in the FNO data


@contextmanager
def flushed_denormals() -> Iterator[None]:
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default (it cannot report the old state)


def wavenumbers(n: int) -> torch.Tensor:
    """Angular wavenumbers 2 pi k of the rFFT modes of an n-point grid on [0, 1)."""
    return 2 * np.pi * torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)


def random_initial(count: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(count, n) float64 draws of the FNO prior: u = sum_k sqrt(lam_k) (a_k sqrt2 cos +
    b_k sqrt2 sin)(2 pi k x), lam_k = sigma^2 / (4 pi^2 k^2 + tau^2)^2, zero mean."""
    k = np.arange(1, n // 2)
    amplitude = GRF_SIGMA / (4 * np.pi**2 * k**2 + GRF_TAU**2) * np.sqrt(2)
    coeff = np.zeros((count, n // 2 + 1), np.complex128)
    a, b = rng.standard_normal((2, count, len(k)))
    # sqrt2 (a cos + b sin)(2 pi k x) = Re[sqrt2 (a - i b) e^{2 pi i k x}]; irfft divides by n
    # and counts each positive mode once, so the coefficient is n/2 * amplitude * (a - i b).
    coeff[:, 1:n // 2] = (n / 2) * amplitude * (a - 1j * b)
    return np.fft.irfft(coeff, n=n)


def solve(u0: np.ndarray, nu: float, times: np.ndarray, dt: float) -> np.ndarray:
    """Solutions at ``times`` (starting at 0) from ``u0`` (batch, n): (batch, len(times), n).

    ``dt`` is the largest step <= the given one that lands exactly on every output time.
    """
    u0 = np.atleast_2d(np.asarray(u0, dtype=np.float64))
    times = np.asarray(times, dtype=np.float64)
    if times[0] != 0 or np.any(np.diff(times) <= 0):
        raise ValueError("times must start at 0 and increase")
    if nu <= 0 or dt <= 0:
        raise ValueError(f"nu and dt must be > 0 (got nu={nu}, dt={dt})")
    n = u0.shape[-1]
    k = wavenumbers(n)
    keep = (torch.arange(len(k)) < n / 3).to(torch.complex128)  # 2/3 rule
    ik_half = (-0.5j * k) * keep

    def nonlinear(u_hat: torch.Tensor) -> torch.Tensor:  # -(u^2/2)_x, dealiased
        u = torch.fft.irfft(u_hat * keep, n=n)
        return ik_half * torch.fft.rfft(u * u)

    out = np.empty((len(u0), len(times), n))
    out[:, 0] = u0
    with flushed_denormals():
        u_hat = torch.fft.rfft(torch.from_numpy(u0))
        for i, span in enumerate(np.diff(times), start=1):
            steps = int(np.ceil(span / dt - 1e-9))
            h = span / steps
            e_half = torch.exp(-nu * k**2 * h / 2).to(torch.complex128)
            e_full = e_half * e_half
            for _ in range(steps):
                a = nonlinear(u_hat)
                b = nonlinear(e_half * (u_hat + h / 2 * a))
                c = nonlinear(e_half * u_hat + h / 2 * b)
                d = nonlinear(e_full * u_hat + h * e_half * c)
                u_hat = e_full * u_hat + h / 6 * (e_full * a + 2 * e_half * (b + c) + d)
            out[:, i] = torch.fft.irfft(u_hat, n=n).numpy()
    return out


def cole_hopf_sine(nu: float, t: float, x: np.ndarray, terms: int = 400) -> np.ndarray:
    """Exact u(x, t) from u0 = sin(2 pi x) by the Cole-Hopf transform u = -2 nu phi_x / phi.

    phi solves the heat equation from phi0 = exp(-(1 - cos 2 pi x) / (4 pi nu)), whose
    Fourier series is a Bessel series: exp(a cos q) = I0(a) + 2 sum_n In(a) cos(n q). The
    exponentially scaled Bessel functions (``ive``) keep every term finite.
    """
    a = 1.0 / (4 * np.pi * nu)
    n = np.arange(1, terms + 1)[:, None]
    weight = ive(n, a) * np.exp(-nu * (2 * np.pi * n) ** 2 * t)
    phi = ive(0, a) + 2 * (weight * np.cos(2 * np.pi * n * x)).sum(0)
    phi_x = -2 * (weight * 2 * np.pi * n * np.sin(2 * np.pi * n * x)).sum(0)
    return -2 * nu * phi_x / phi
