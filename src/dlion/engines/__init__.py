"""Engines run strategies: `sim` on a virtual clock."""
