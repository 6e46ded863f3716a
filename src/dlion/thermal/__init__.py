"""Heat-budget-aware DVFS scheduling (Sparta, EDGE '21): keep edge devices cool and fast.

A device model (frequency levels, static + dynamic power, lumped RC thermal model), four
frequency policies (performance, fixed cap, reactive throttling, Sparta), two backends behind
one interface (a simulated device and Linux sysfs), a simulator, a benchmark and the
`dlion thermal` commands.
"""

from dlion.thermal.config import ThermalConfig, load_thermal_config
from dlion.thermal.device import DeviceProfile, load_profile, shipped_profiles
from dlion.thermal.errors import ThermalError
from dlion.thermal.policies import POLICIES, Observation, Policy, build_policy
from dlion.thermal.sim import SimResult, simulate
from dlion.thermal.table import StartTable
from dlion.thermal.workload import SHIPPED_WORKLOADS, Phase, Workload

__all__ = [
    "POLICIES",
    "SHIPPED_WORKLOADS",
    "DeviceProfile",
    "Observation",
    "Phase",
    "Policy",
    "SimResult",
    "StartTable",
    "ThermalConfig",
    "ThermalError",
    "Workload",
    "build_policy",
    "load_profile",
    "load_thermal_config",
    "shipped_profiles",
    "simulate",
]
