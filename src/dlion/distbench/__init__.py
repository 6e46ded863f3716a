"""`dlion dist ...`: benchmarks of the dist engine against the sim and DDP."""
