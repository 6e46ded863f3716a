"""One replica's model, objective and optimizer, and what a run prepares."""
