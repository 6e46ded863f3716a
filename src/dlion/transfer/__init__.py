"""Cross-modality transfer (RecycleML, EdgeSys '18): reuse a trained sensor model for a new
modality with few or no labels."""
