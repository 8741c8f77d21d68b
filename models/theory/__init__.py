"""The mathematics, in numpy and scipy only (no torch): ``python -m app solve`` imports it alone.

* ``moments``: closed forms of E[f], E[f²], φ(q), dφ/dq, 1 + δ_q, γ_{q=1} and eq. 12;
* ``solver``: λ, α, β (and κ) of each activation from ε (eq. 11, eq. 13, Table 5);
* ``propagation``: the mean-field recursion of E[h²] and ‖∂L/∂W‖ through a network's layers.

The closed forms are re-exported here: ``from models import theory; theory.phi(f, q)``.
"""
from models.theory.moments import (INV_SQRT_2PI, SeluFamily, dphi_dq, gamma_q1, mean, mills,
                                   mills_prime, one_plus_delta_q, output_mean, phi,
                                   second_moment)

__all__ = ["INV_SQRT_2PI", "SeluFamily", "dphi_dq", "gamma_q1", "mean", "mills", "mills_prime",
           "one_plus_delta_q", "output_mean", "phi", "second_moment"]
