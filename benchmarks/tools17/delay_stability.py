"""Issue 17 sections 14c/14d: the largest stable step of heavy-ball SGD on a 1-D quadratic
(curvature h) when a fraction f of the gradient arrives one iteration late, as in lock-step
DLion sites of equal pace (f = 2/3 with three equal sites). Prints eta*h at the stability edge.

Update (14c, lock-step): v <- beta v + (1 - f) g(x_t) + f g(x_{t-1}); x <- x - eta v, g(x) = h x.

14d compares the remedies for f = 2/3, beta = 0.9:
- sync (`site_sync`): a share q of the remote part arrives in the same iteration (what the
  pipe's budget carried), the rest one iteration late: f is replaced by f (1 - q);
- catch-up (delay-compensated momentum, not adopted): the late part enters the buffer as
  if it had been there one step earlier, u_t = (1-f) g_t + f (1+beta) g_{t-1} - f beta g_{t-2}
  (x then follows the undelayed trajectory except for the one missed displacement);
- all at once (not adopted): the late part's whole momentum effect in one step,
  u_t = (1-f) g_t + f/(1-beta) g_{t-1} - f beta/(1-beta) g_{t-2}.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def spectral_radius(a: float, beta: float, f: float) -> float:
    """In x alone (a = eta * h): x_{t+1} - x_t = beta (x_t - x_{t-1}) - a ((1-f) x_t + f x_{t-1}),
    a linear recurrence on (x_t, x_{t-1}); stable while its spectral radius is below 1."""
    c0 = 1 + beta - a * (1 - f)
    c1 = -beta - a * f
    m = np.array([[c0, c1], [1.0, 0.0]])
    return float(max(abs(np.linalg.eigvals(m))))


def largest_stable(radius: Callable[[float], float], points: int) -> float:
    """The largest step a of np.linspace(1e-3, 4, points) below which every step is stable
    (spectral radius < 1)."""
    lo = 0.0
    for a in np.linspace(1e-3, 4.0, points):
        if radius(a) < 1:
            lo = a
        else:
            break
    return lo


def edge(beta: float, f: float) -> float:
    return largest_stable(lambda a: spectral_radius(a, beta, f), 40000)


def rule_radius(a: float, beta: float, weights: tuple[float, float, float]) -> float:
    """Spectral radius of v <- beta v + w0 g_t + w1 g_{t-1} + w2 g_{t-2}; x <- x - a v (h = 1),
    as the linear map on (x_t, x_{t-1}, x_{t-2}, v_{t-1})."""
    w0, w1, w2 = weights
    m = np.array(
        [
            [1 - a * w0, -a * w1, -a * w2, -a * beta],
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [w0, w1, w2, beta],
        ]
    )
    return float(max(abs(np.linalg.eigvals(m))))


def rule_edge(beta: float, weights: tuple[float, float, float]) -> float:
    return largest_stable(lambda a: rule_radius(a, beta, weights), 8000)


if __name__ == "__main__":
    for beta in (0.9, 0.5, 0.0):
        edges = [edge(beta, f) for f in (0.0, 1 / 3, 2 / 3)]
        print(
            f"momentum {beta}: eta*h edge at f = 0, 1/3, 2/3: "
            + ", ".join(f"{e:.3f}" for e in edges)
            + f"; as eta/(1-beta)*h: {', '.join(f'{e / (1 - beta):.2f}' for e in edges)}"
        )
    beta, f = 0.9, 2 / 3
    print(f"remedies at momentum {beta}, f = 2/3 late (eta*h edge):")
    for q in (0.0, 0.5, 0.8, 0.9, 1.0):
        late = f * (1 - q)
        print(f"  sync, share q = {q} of the remote part on time: {edge(beta, late):.3f}")
    catch_up = (1 - f, f * (1 + beta), -f * beta)
    at_once = (1 - f, f / (1 - beta), -f * beta / (1 - beta))
    print(f"  lock-step, late part caught up in the buffer: {rule_edge(beta, catch_up):.3f}")
    print(f"  lock-step, late part's momentum effect at once: {rule_edge(beta, at_once):.3f}")
