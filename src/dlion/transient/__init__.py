"""Training on transient (preemptible) servers: instance catalog, revocation model, cost
accounting, performance model and planner (Li et al., ICAC '19 and ICDCS '20)."""
