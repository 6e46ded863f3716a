"""Heat-budget-aware DVFS scheduling (Sparta, EDGE '21): keep edge devices cool and fast.

A device model (frequency levels, static + dynamic power, lumped RC thermal model), four
frequency policies (performance, fixed cap, reactive throttling, Sparta), two backends behind
one interface (a simulated device and Linux sysfs), a simulator, a benchmark and the
`dlion thermal` commands.
"""
