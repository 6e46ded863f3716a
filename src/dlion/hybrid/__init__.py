"""Selective-query hybrid edge/cloud inference (Kag et al., "Efficient Edge Inference by
Selective Query", ICLR '23): an edge model, a cloud model and a router that decides per input
whether to answer on the edge or query the cloud.

Modules, one job each: `config` (typed config, presets), `models` (edge/cloud model registry),
`proxy` (proxy labels, router features), `router` (the router MLP and its loss), `calibrate`
(thresholds for a target coverage), `latency` (the latency model), `inference` (predictions
and send scores), `train` (alternating training), `evaluate` (coverage tables and curves),
`route` (routing new inputs), `store` (saved runs), `report` (table rows, plots), `bench`
(datasets x seeds), `cli` (`dlion hybrid ...`).
"""
