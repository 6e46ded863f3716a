"""Issue 17 section 14c: the largest stable step of heavy-ball SGD on a 1-D quadratic (curvature
h) when a fraction f of the gradient arrives one iteration late, as in lock-step DLion sites
of equal pace (f = 2/3 with three equal sites). Prints eta*h at the stability edge.

Update: v <- beta v + (1 - f) g(x_t) + f g(x_{t-1}); x <- x - eta v, with g(x) = h x.
"""

from __future__ import annotations

import numpy as np


def spectral_radius(a: float, beta: float, f: float) -> float:
    """In x alone (a = eta * h): x_{t+1} - x_t = beta (x_t - x_{t-1}) - a ((1-f) x_t + f x_{t-1}),
    a linear recurrence on (x_t, x_{t-1}); stable while its spectral radius is below 1."""
    c0 = 1 + beta - a * (1 - f)
    c1 = -beta - a * f
    m = np.array([[c0, c1], [1.0, 0.0]])
    return float(max(abs(np.linalg.eigvals(m))))


def edge(beta: float, f: float) -> float:
    lo = 0.0
    for a in np.linspace(1e-3, 4.0, 40000):
        if spectral_radius(a, beta, f) < 1:
            lo = a
        else:
            break
    return lo


if __name__ == "__main__":
    for beta in (0.9, 0.5, 0.0):
        edges = [edge(beta, f) for f in (0.0, 1 / 3, 2 / 3)]
        print(
            f"momentum {beta}: eta*h edge at f = 0, 1/3, 2/3: "
            + ", ".join(f"{e:.3f}" for e in edges)
            + f"; as eta/(1-beta)*h: {', '.join(f'{e / (1 - beta):.2f}' for e in edges)}"
        )
