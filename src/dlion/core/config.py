"""Typed experiment config: pydantic models, YAML, `--set a.b=v` overrides, one-line errors."""

from __future__ import annotations

import copy
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from dlion.core.errors import ConfigError
from dlion.core.registry import check_options
from dlion.core.strict_yaml import INT64_MAX, strict_load


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored. No float
    field takes inf or nan (they would crash strict JSON far from the config)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- cluster


class SiteConfig(_Strict):
    name: str = Field(description="Site (micro-cloud) name, referenced by workers and links.")
    intra_bandwidth_mbps: float = Field(
        1000.0, gt=0, description="Bandwidth of every link between two workers of this site."
    )
    intra_latency_ms: float = Field(0.1, ge=0, description="Latency inside this site.")
    uplink_mbps: float | None = Field(
        None,
        gt=0,
        description="WAN uplink shared by all of this site's outgoing inter-site traffic "
        "(every site pipe it sends on); None means the pipes alone limit it.",
    )
    downlink_mbps: float | None = Field(
        None,
        gt=0,
        description="WAN downlink shared by all inter-site traffic into this site; "
        "None means the pipes alone limit it.",
    )


class WorkerConfig(_Strict):
    site: str = Field(description="Name of the site this worker lives in.")
    capacity_gflops: float = Field(
        gt=0, description="Effective compute capacity (GFLOP/s) for training this model."
    )
    # 0 by default: a step is then FLOPs x batch / capacity, as every shipped result assumes.
    step_overhead_ms: float = Field(
        0.0,
        ge=0,
        description="Fixed cost of every training step (ms) beside the per-sample work: "
        "step time = overhead + FLOPs x batch / capacity (`dlion probe` fits both).",
    )
    nic_mbps: float | None = Field(
        None,
        gt=0,
        description="NIC capacity shared by all of this worker's transfers; "
        "None means the NIC is never the bottleneck.",
    )
    # Bounded so that a typo (count: 1e9) is an error, not an out-of-memory crash.
    count: int = Field(
        1, ge=1, le=10_000, description="Replicate this worker entry this many times."
    )


def _sites_or_workers(model: Any) -> Any:
    """Links and bandwidth traces join two sites or two workers, never both or neither."""
    if (model.sites is None) == (model.workers is None):
        raise ValueError("give exactly one of 'sites' or 'workers'")
    return model


class LinkConfig(_Strict):
    """Site-to-site link, or a per-pair override when `workers` is given.

    Between two different sites the link is one pipe per direction, shared max-min fairly
    by every flow from one site to the other (a site reaches another through one WAN path).
    The same site twice sets the links inside it: one per worker pair, as the intra-site
    values do. A `workers` entry is a dedicated link of that pair alone (each direction):
    it bypasses the site pipes and uplinks and shares only the two workers' NICs."""

    sites: tuple[str, str] | None = Field(
        None, description="The two sites this link joins (one shared pipe per direction)."
    )
    workers: tuple[int, int] | None = Field(
        None, description="Per-pair override: the two worker ranks this dedicated link joins."
    )
    bandwidth_mbps: float = Field(gt=0, description="Link bandwidth in Mbit/s.")
    latency_ms: float = Field(ge=0, description="One-way latency in ms.")

    _one_endpoint_kind = model_validator(mode="after")(_sites_or_workers)


class ClusterConfig(_Strict):
    sites: list[SiteConfig] = Field(min_length=1)
    workers: list[WorkerConfig] = Field(min_length=1)
    links: list[LinkConfig] = Field(default_factory=list)
    default_inter_bandwidth_mbps: float = Field(
        100.0,
        gt=0,
        description="Bandwidth between sites that no link entry names: one shared pipe per "
        "direction per such site pair, as a `sites` entry gives.",
    )
    default_inter_latency_ms: float = Field(10.0, ge=0)


# ----------------------------------------------------------------------------- data/model


class DatasetSource(_Strict):
    """Which dataset and how it is split into train and test (shared by every config kind)."""

    name: Literal["digits", "mnist1d", "synthetic", "mnist-idx", "cifar10", "npz"] = "digits"
    path: str | None = Field(None, description="File or directory for user data formats.")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    num_samples: int | None = Field(None, ge=20, description="Generated datasets: sample count.")
    num_features: int = Field(32, ge=2, description="synthetic: feature count.")
    num_classes: int = Field(10, ge=2, description="synthetic: class count.")


BUILTIN_DATASETS = ("digits", "mnist1d", "synthetic", "mnist-idx", "cifar10", "npz")
BUILTIN_MODELS = ("mlp", "cnn")
BUILTIN_LOSSES = ("cross_entropy", "mse")
BUILTIN_METRICS = ("accuracy", "loss")
BUILTIN_OPTIMIZERS = ("sgd", "adamw")


def _builtin_or_reference(value: str, builtins: tuple[str, ...], what: str) -> str:
    """A built-in name, or "pkg.module:attr" naming the user's own code."""
    if value in builtins or (":" in value and all(value.partition(":")[::2])):
        return value
    raise ValueError(
        f"unknown {what} {value!r}: choose from {', '.join(builtins)}, "
        "or name your own as 'package.module:function'"
    )


def _named(builtins: tuple[str, ...], what: str) -> AfterValidator:
    return AfterValidator(lambda value: _builtin_or_reference(value, builtins, what))


class DataConfig(DatasetSource):
    name: Annotated[str, _named(BUILTIN_DATASETS, "dataset")] = Field(  # type: ignore[assignment]
        "digits",
        description="A built-in dataset, or 'pkg.module:builder' returning (train, test) "
        "map-style torch Datasets whose items are (input, target).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for a user's dataset builder."
    )
    labels: Annotated[str, _named((), "labels function")] | None = Field(
        None,
        description="'pkg.module:fn' returning the train set's labels (for the partitioners); "
        "default: the dataset's `targets` attribute, else item[1] of every sample.",
    )
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (non-IID skew).")
    shards_per_worker: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _options_for_builders(self) -> DataConfig:
        if self.options and self.name in BUILTIN_DATASETS:
            raise ValueError(
                "options: only a user's dataset builder ('pkg.module:fn') takes options"
            )
        return self

    @property
    def is_builtin(self) -> bool:
        return self.name in BUILTIN_DATASETS


class ModelConfig(_Strict):
    name: Annotated[str, _named(BUILTIN_MODELS, "model")] = Field(
        "mlp",
        description="mlp, cnn, or 'pkg.module:builder' returning a torch.nn.Module (called with "
        "`options` as keywords, plus input_shape and num_classes when it accepts them).",
    )
    hidden: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for a user's model builder."
    )

    @model_validator(mode="after")
    def _options_for_builders(self) -> ModelConfig:
        if self.options and self.name in BUILTIN_MODELS:
            raise ValueError(
                "options: built-in models take `hidden` and `channels`; options are for "
                "a user's builder ('pkg.module:fn')"
            )
        return self


def _name_shorthand(cls: type[BaseModel], data: Any) -> Any:
    """A section given as a bare name means {name: NAME}: `train.optimizer: adamw` (or
    --set train.optimizer=adamw) is {name: adamw}."""
    return {"name": data} if isinstance(data, str) else data


class OptimizerConfig(_Strict):
    """The optimizer a replica applies its aggregated update with (torch.optim semantics).
    `train.lr`, `train.momentum` (sgd) and `train.weight_decay` fill its hyperparameters
    unless `options` sets them."""

    name: Annotated[str, _named(BUILTIN_OPTIMIZERS, "optimizer")] = Field(
        "sgd",
        description="sgd (momentum, torch.optim.SGD's rule on the flat vector), adamw "
        "(torch.optim.AdamW), or 'pkg.module:fn' called as fn(params, lr=..., **options) "
        "returning a torch.optim.Optimizer (e.g. 'torch.optim:RAdam').",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Further keyword arguments (betas, eps, ...)."
    )

    _shorthand = model_validator(mode="before")(_name_shorthand)


class ScheduleConfig(_Strict):
    """Learning-rate schedule over a replica's own update count, as a factor of `train.lr`:
    linear warmup from 0 over `warmup_steps`, then constant, step (x gamma every
    `step_size` updates) or cosine (to `min_factor` at `total_steps`)."""

    name: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="Updates of linear warmup from lr 0.")
    step_size: int = Field(100, ge=1, description="step: updates between two decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="step: decay factor.")
    total_steps: int | None = Field(
        None,
        ge=1,
        description="cosine: updates to the end of the cosine (default: train.max_iterations).",
    )
    min_factor: float = Field(0.0, ge=0, le=1, description="cosine: final lr / train.lr.")

    _shorthand = model_validator(mode="before")(_name_shorthand)


# ----------------------------------------------------------------------------- strategy


class StrategyConfig(_Strict):
    name: str = Field("dlion", description="Registered strategy name (`dlion strategies`).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Strategy-specific options, validated by its model."
    )


class TrainConfig(_Strict):
    seed: int = Field(0, ge=0, le=INT64_MAX, description="Seed of everything random.")
    target_acc: float = Field(
        0.95,
        allow_inf_nan=False,
        description="Mean replica value of `evaluation.metric` to reach (for accuracy, in "
        "(0, 1]; for a lower-is-better metric, reached when the mean falls to it).",
    )
    max_time: float = Field(60.0, gt=0, description="Stop after this many (virtual) seconds.")
    stop_at_target: bool = True
    batch_per_worker: int = Field(
        32, ge=1, description="Configured per-worker batch; the global batch G is N times this."
    )
    lr: float = Field(0.05, gt=0, description="Learning rate, set for the global batch.")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_iterations: int | None = Field(None, ge=1, description="Optional cap on iterations.")
    loss: Annotated[str, _named(BUILTIN_LOSSES, "loss")] = Field(
        "cross_entropy",
        description="cross_entropy, mse, or 'pkg.module:fn' called as fn(outputs, targets) "
        "returning a scalar tensor.",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class JobEngineConfig(_Strict):
    """The `engine:` fields of every kind of job (strategy and FL configs): which engine,
    the message envelope, and how the dist engine's processes meet and are paced."""

    name: Literal["sim", "dist"] = Field(
        "sim",
        description="sim: virtual clock in one process; dist: real processes "
        "(engines/dist.py for strategies, fl/processes.py for FL).",
    )
    header_bytes: int = Field(
        64, ge=0, description="Per-message envelope size charged by the network model."
    )
    threads: int = Field(1, ge=1, description="torch intra-op threads per process.")
    time_scale: float = Field(
        1.0,
        gt=0,
        description="dist: wall seconds per config (scenario) second. Compute throttling, "
        "link shaping, latencies and timeouts (for FL also availability periods and the eval "
        "grid) all stretch by it, so a small host can emulate a slower cluster.",
    )
    max_message_mb: float = Field(
        64.0, gt=0, description="dist: frames larger than this are refused (and the link dropped)."
    )
    secret: str | None = Field(
        None,
        description="dist: shared secret; processes that cannot prove it are refused at join. "
        "The DLION_SECRET environment variable sets it too (and wins); prefer it to the file.",
    )
    host: str = Field("127.0.0.1", description="dist: address the job's store binds to.")
    port: int = Field(0, ge=0, le=65535, description="dist: store port (0: any free).")
    startup_timeout: float = Field(
        120.0, gt=0, description="dist: wall seconds to wait for every process to connect."
    )


class EngineConfig(JobEngineConfig):
    recv_timeout: float = Field(
        30.0, gt=0, description="Default receive timeout (virtual seconds in the sim)."
    )
    measure_min_bytes: int = Field(
        16_384,
        ge=1,
        description="dist (shaping kernel or none): the receiver's timing of frames at "
        "least this large feeds the sender's per-link bandwidth estimate; a smaller one's "
        "only if it takes 10 ms or more at the estimate (comm/delivery.py): a few packets "
        "cross at line rate and would overstate it.",
    )
    probe_bytes: int = Field(
        32_768,
        ge=0,
        description="dist (shaping kernel or none): when the links are formed, each worker "
        "sends every peer four frames of this size; the median of the receiver's rates for "
        "the last three seeds the link's estimate, so a wrong configured speed never steers "
        "the first sends (32 kB: 65 ms on 4 Mbit/s, long enough to time); 0: start from "
        "the config.",
    )
    delivery_window: int = Field(
        3,
        ge=1,
        description="dist (shaping kernel or none): a link's estimate is the smallest of "
        "the last N receiver-timed rates (a receiver woken late overstates a rate, in runs), "
        "so a slower link is followed at the next timed send and a faster one after N (and "
        "at most delivery_max_rise x per send).",
    )
    delivery_max_rise: float = Field(
        2.0,
        gt=1,
        description="dist (shaping kernel or none): one acknowledgement raises a link's "
        "estimate at most this many times (late receiver wake-ups overstate rates in runs; "
        "a drop is followed at once).",
    )
    bandwidth_ema: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Weight of the newest observed throughput in a worker's per-link "
        "bandwidth estimate (ctx.bandwidth); 1.0 trusts the last transfer alone.",
    )
    charge_vector_work: bool = Field(
        True,
        description="Charge each strategy's vector work besides the gradient (optimizer "
        "steps, sums, top-k, scans, quantization) from the calibrated cost model "
        "(dlion.cluster.vector_cost); false: only gradients cost time (results before issue 16 "
        "part 4).",
    )
    vector_cost_batch: int | None = Field(
        None,
        ge=1,
        description="The batch at which the speed rule compares a worker's step with the "
        "calibration host's (dlion.cluster.vector_cost); None: train.batch_per_worker. The "
        "ideal bound sets its cluster's per-worker batch, so that its summed worker pays "
        "vector work as a worker of that capacity in that cluster would.",
    )
    # ---- dist engine only
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="dist transport: auto picks nccl when CUDA is available, else gloo."
    )
    shaping: Literal["transport", "kernel", "none"] = Field(
        "transport",
        description="dist: transport = sender-side pacing of each link's bandwidth plus its "
        "latency; kernel = bandwidth left to tc (netns), latency added by the receiving worker; "
        "none = neither.",
    )
    peer_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds until peers notice a silent (crashed) worker is gone (virtual in "
        "the sim; wall in dist, where a heartbeat older than this drops the peer); an "
        "announced departure is noticed at once.",
    )
    heartbeat_s: float = Field(0.5, gt=0, description="dist: heartbeat period (wall seconds).")
    join_margin_s: float = Field(
        2.0,
        gt=0,
        description="dist: a joiner takes part from the iteration the fastest member will "
        "reach this many wall seconds later, so every member hears of it first.",
    )


class EvaluationConfig(_Strict):
    every_s: float = Field(
        0.5, gt=0, description="Evaluate every replica every this many (virtual) seconds."
    )
    max_test_samples: int | None = Field(None, ge=1, description="Evaluate on a test subset.")
    batch_size: int = Field(
        1024, ge=1, description="Evaluation reads the test set in minibatches of this size."
    )
    metric: Annotated[str, _named(BUILTIN_METRICS, "metric")] = Field(
        "accuracy",
        description="accuracy (classification), loss (the training loss on the test set), or "
        "'pkg.module:fn' called as fn(outputs, targets) returning a float (the batch mean).",
    )
    higher_is_better: bool | None = Field(
        None,
        description="Direction of the metric: None takes it from the metric (accuracy higher, "
        "loss lower; a user's metric higher unless set).",
    )

    @property
    def higher_better(self) -> bool:
        if self.higher_is_better is not None:
            return self.higher_is_better
        return self.metric != "loss"


class OutputConfig(_Strict):
    save_model: Literal["best", "rank0", "average", "none"] = Field(
        "best",
        description="Which replica DIR/model.safetensors holds at the end: the one with the "
        "best final metric, rank 0 (the lowest live rank), the average of the live replicas "
        "(parameters and float buffers), or none.",
    )


class CheckpointConfig(_Strict):
    every_s: float | None = Field(
        None,
        gt=0,
        description="Write a checkpoint every this many seconds (virtual in the sim, taken at "
        "the first evaluation point at or after each multiple; wall in dist, stretched by "
        "engine.time_scale for FL, whose server also checkpoints when stopped); None: never.",
    )
    keep: int = Field(
        2, ge=1, description="Checkpoints kept: the newest and, by default, the one before it."
    )


# ----------------------------------------------------------------------------- dynamics


class RandomWalkTrace(_Strict):
    """A seeded multiplicative random walk, one step every `every_s` seconds."""

    every_s: float = Field(gt=0, description="Seconds between two steps of the walk.")
    step: float = Field(
        0.2, gt=0, lt=1, description="Largest relative change per step: v *= 1 + U(-step, step)."
    )
    start: float = Field(1.0, gt=0, description="Value at time 0.")
    low: float = Field(0.1, gt=0, description="The walk never goes below this value.")
    high: float = Field(2.0, gt=0, description="The walk never goes above this value.")
    seed: int = Field(0, description="This walk's own seed (same seed, same walk).")

    @model_validator(mode="after")
    def _bounds(self) -> RandomWalkTrace:
        if not self.low <= self.start <= self.high:
            raise ValueError(
                f"need low <= start <= high, got {self.low}, {self.start}, {self.high}"
            )
        return self


class PeriodicTrace(_Strict):
    """Periodic interference: `low` for the first `duty` share of every period, else `high`."""

    period_s: float = Field(gt=0, description="Length of one period in seconds.")
    duty: float = Field(gt=0, lt=1, description="Share of each period under interference.")
    low: float = Field(gt=0, description="Value while interfered with.")
    high: float = Field(1.0, gt=0, description="Value otherwise.")
    phase_s: float = Field(0.0, ge=0, description="Start of the first interference.")


class StepTrace(_Strict):
    """One step change: `before` until `at_s`, then `to`."""

    at_s: float = Field(ge=0, description="Time of the change in seconds.")
    to: float = Field(gt=0, description="Value from `at_s` on.")
    before: float = Field(1.0, gt=0, description="Value before `at_s`.")


class TraceSpec(_Strict):
    """A piecewise-constant trace; exactly one source. Values are factors of the configured
    capacity or bandwidth (1.0 = as configured) unless `absolute` is set."""

    points: list[tuple[float, float]] | None = Field(
        None, description="[[t, value], ...] change points (the first value holds from t=0)."
    )
    csv: str | None = Field(
        None, description="CSV file of `time,value` rows (relative to the working directory)."
    )
    random_walk: RandomWalkTrace | None = None
    periodic: PeriodicTrace | None = None
    step: StepTrace | None = None
    absolute: bool = Field(
        False, description="Values are GFLOP/s (capacity) or Mbit/s (bandwidth), not factors."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TraceSpec:
        sources = [self.points, self.csv, self.random_walk, self.periodic, self.step]
        if sum(s is not None for s in sources) != 1:
            raise ValueError("give exactly one of points, csv, random_walk, periodic, step")
        if self.points is not None:
            if not self.points:
                raise ValueError("points: give at least one [t, value] pair")
            for t, v in self.points:
                if not (math.isfinite(t) and t >= 0 and math.isfinite(v) and v > 0):
                    raise ValueError(f"points: need t >= 0 and value > 0, got [{t}, {v}]")
        return self


class CapacityTrace(TraceSpec):
    worker: int = Field(ge=0, description="Rank of the worker whose compute capacity varies.")


class BandwidthTrace(TraceSpec):
    """Varies the links between two sites (every worker pair, both directions; the same
    site twice: the links inside it) or between two workers (both directions)."""

    sites: tuple[str, str] | None = Field(None, description="The two sites the links join.")
    workers: tuple[int, int] | None = Field(None, description="The two worker ranks.")

    _one_endpoint_kind = model_validator(mode="after")(_sites_or_workers)


MembershipKind = Literal["leave", "crash", "join"]


class MembershipEvent(_Strict):
    """A worker leaves (announced: peers learn at once), crashes (silent: peers learn after
    `engine.peer_timeout`) or joins (a new or returning worker; it is ready after
    `startup_s` and starts from the current model of a live peer). A rank whose first
    event is a join is absent from the start (a new worker)."""

    at_s: float = Field(ge=0, description="Time of the event in seconds.")
    rank: int = Field(ge=0, description="The worker's rank in the cluster.")
    event: MembershipKind = Field(description="leave, crash or join.")
    startup_s: float = Field(
        0.0, ge=0, description="join only: seconds from the event until the worker is ready."
    )

    @model_validator(mode="after")
    def _startup_for_join(self) -> MembershipEvent:
        if self.startup_s and self.event != "join":
            raise ValueError("startup_s applies to join events only")
        return self

    @property
    def ready_s(self) -> float:
        """When the event takes effect: a join once its startup is over."""
        return self.at_s + self.startup_s


class RandomDepartures(_Strict):
    """Seeded random departures: each worker's time to departure is exponential with mean
    `mean_lifetime_s`; it may come back after `rejoin_after_s`. Ranks that have explicit
    membership events are left alone."""

    mean_lifetime_s: float = Field(gt=0, description="Mean time until a worker departs.")
    event: Literal["leave", "crash"] = Field("crash", description="How workers depart.")
    rejoin_after_s: float | None = Field(
        None, ge=0, description="Startup time of the worker's return (None: never returns)."
    )
    min_live: int = Field(
        1, ge=1, description="A departure that would leave fewer live workers is skipped."
    )
    seed: int = Field(0, description="Seed of the departure draws.")


class DynamicsConfig(_Strict):
    """Changing resources: capacity and bandwidth traces, workers leaving and joining.
    Empty by default: a static cluster."""

    capacity: list[CapacityTrace] = Field(default_factory=list)
    bandwidth: list[BandwidthTrace] = Field(default_factory=list)
    membership: list[MembershipEvent] = Field(default_factory=list)
    random_departures: RandomDepartures | None = None

    @property
    def empty(self) -> bool:
        return not (self.capacity or self.bandwidth or self.membership or self.random_departures)


class ExperimentConfig(_Strict):
    name: str = "experiment"
    description: str = ""
    cluster: ClusterConfig
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _target_in_range(self) -> ExperimentConfig:
        if self.evaluation.metric == "accuracy" and not 0 < self.train.target_acc <= 1:
            raise ValueError(
                f"train.target_acc: an accuracy target must be in (0, 1], got "
                f"{self.train.target_acc}"
            )
        if self.evaluation.metric == "accuracy" and self.train.loss == "mse":
            raise ValueError(
                "evaluation.metric: accuracy needs a classification loss; with train.loss mse "
                "use metric loss or your own"
            )
        return self

    @model_validator(mode="after")
    def _sites_exist(self) -> ExperimentConfig:
        names = [s.name for s in self.cluster.sites]
        if len(set(names)) != len(names):
            raise ValueError("cluster.sites: site names must be unique")
        for i, w in enumerate(self.cluster.workers):
            if w.site not in names:
                raise ValueError(f"cluster.workers.{i}.site: unknown site {w.site!r}")
        for i, link in enumerate(self.cluster.links):
            for s in link.sites or ():
                if s not in names:
                    raise ValueError(f"cluster.links.{i}.sites: unknown site {s!r}")
        _check_dynamics(self.dynamics, names, sum(w.count for w in self.cluster.workers))
        return self


def _check_dynamics(dyn: DynamicsConfig, sites: list[str], n: int) -> None:
    """Ranks and sites exist, and every worker's membership story is possible."""
    for i, cap in enumerate(dyn.capacity):
        if cap.worker >= n:
            raise ValueError(f"dynamics.capacity.{i}.worker: no rank {cap.worker} (0..{n - 1})")
    for i, bw in enumerate(dyn.bandwidth):
        for s in bw.sites or ():
            if s not in sites:
                raise ValueError(f"dynamics.bandwidth.{i}.sites: unknown site {s!r}")
        if bw.workers is not None and (max(bw.workers) >= n or bw.workers[0] == bw.workers[1]):
            raise ValueError(
                f"dynamics.bandwidth.{i}.workers: need two different ranks in 0..{n - 1}"
            )
    for i, ev in enumerate(dyn.membership):
        if ev.rank >= n:
            raise ValueError(f"dynamics.membership.{i}.rank: no rank {ev.rank} (0..{n - 1})")
    check_membership(dyn.membership, n)


def initially_absent(events: list[MembershipEvent]) -> set[int]:
    """Ranks whose first event is a join: new workers, absent until they join."""
    first: dict[int, MembershipKind] = {}
    for ev in sorted(events, key=lambda e: e.at_s):
        first.setdefault(ev.rank, ev.event)
    return {r for r, kind in first.items() if kind == "join"}


def check_membership(events: list[MembershipEvent], n: int) -> None:
    """Each rank alternates present/absent (leave or crash only while present, join only
    while absent, no event before a join is complete) and one worker is always present."""
    if not events:
        return
    order = sorted(range(len(events)), key=lambda i: (events[i].at_s, i))
    present = set(range(n)) - initially_absent(events)
    busy_until: dict[int, float] = {}  # a joining worker is not present until it is ready
    effects: list[tuple[float, int, int, MembershipKind]] = []
    for i in order:
        ev = events[i]
        where = f"dynamics.membership.{i}"
        if ev.at_s < busy_until.get(ev.rank, -1.0):
            raise ValueError(
                f"{where}: rank {ev.rank} is still starting up until {busy_until[ev.rank]} s"
            )
        if ev.event == "join":
            if ev.rank in present:
                raise ValueError(f"{where}: rank {ev.rank} joins at {ev.at_s} s but is present")
            present.add(ev.rank)
            busy_until[ev.rank] = ev.ready_s
        else:
            if ev.rank not in present:
                raise ValueError(
                    f"{where}: rank {ev.rank} cannot {ev.event} at {ev.at_s} s: it is absent"
                )
            present.discard(ev.rank)
        effects.append((ev.ready_s, i, ev.rank, ev.event))
    live = set(range(n)) - initially_absent(events)
    if not live:
        raise ValueError("dynamics.membership: no worker is present at time 0")
    for t, i, rank, kind in sorted(effects):
        if kind == "join":
            live.add(rank)
        else:
            live.discard(rank)
        if not live:
            raise ValueError(
                f"dynamics.membership.{i}: no worker left at {t} s (keep at least one)"
            )


# ----------------------------------------------------------------------------- loading


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # A key typed with control characters (a stray newline) must not break the one-line error.
    loc = ".".join(str(p) if str(p).isprintable() else repr(str(p)) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if "input" in first and first["type"] not in ("missing",) and not loc.endswith("]"):
        given = repr(first["input"])
        if len(given) <= 40:
            msg = f"{msg}, got {given}"
    return f"{loc}: {msg}{extra}" if loc else f"{msg}{extra}"


def _parse_value(key: str, text: str) -> Any:
    """Parse an override value with YAML rules, so `true`, `3`, `0.1`, `[1,2]` are typed;
    text that is not YAML stays text, but a duplicate key or a non-finite number is an error."""
    try:
        return strict_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"--set {key}: {exc.problem}") from None
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw config dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.seed=1")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node: Any = out
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {path} is not a valid list index")
                index: int | str = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                parent = ".".join(parts[:depth])
                raise ConfigError(f"--set {key}: {parent} is a value, not a section")
            if last:
                node[index] = _parse_value(key, value)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[index]
    return out


def shipped_names(folder: str) -> list[str]:
    """Names of the YAML presets shipped in the package folder (scenarios, suites)."""
    root = resources.files("dlion") / folder
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def shipped_scenarios() -> list[str]:
    return shipped_names("scenarios")


def read_source(source: str, folder: str, what: str, preset: str | None = None) -> str:
    """Text of a user's YAML file, or of the preset of that name shipped in `folder`
    (`preset`: what the error calls one; default: the folder's name, singular)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return read_text_file(path, what)
    if source in shipped_names(folder):
        return (resources.files("dlion") / folder / f"{source}.yaml").read_text()
    known = ", ".join(shipped_names(folder))
    preset = preset or folder.removesuffix("s")
    raise ConfigError(f"{source}: not a {what} file or a shipped {preset} ({known})")


def read_text_file(path: Path, what: str) -> str:
    """A user's text file, or a ConfigError naming it (missing, a directory, not UTF-8)."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what} file")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None


def parse_yaml_mapping(text: str, origin: str) -> dict[str, Any]:
    """YAML text whose top level must be a mapping; errors name the file and line (strict:
    duplicate keys and non-finite numbers are errors, see strict_yaml.py)."""
    try:
        raw = strict_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{origin}:{where} {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    return raw


def source_identity(source: str) -> str:
    """What an `extends` chain compares to find a cycle: a file's resolved path (so
    `a.yaml` and `./x/../a.yaml` are one file), else the preset name."""
    path = Path(source)
    return str(path.resolve()) if path.is_file() else source


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_source(
    source: str, folder: str = "scenarios", preset: str = "scenario", _chain: tuple[str, ...] = ()
) -> tuple[dict[str, Any], str]:
    """Read a YAML path, or the name of a preset shipped in `folder` (scenarios; FL configs
    too); returns (raw dict, where it came from).

    A config may start with `extends: NAME_OR_PATH` to take another config as its base
    (a path is relative to the extending file) and change only what differs.
    """
    if source_identity(source) in map(source_identity, _chain):
        raise ConfigError(f"{source}: extends itself ({' -> '.join([*_chain, source])})")
    raw = parse_yaml_mapping(read_source(source, folder, "config", preset), source)
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{source}: extends: expected a {preset} name or YAML path")
        path = Path(source)
        if path.is_file() and not Path(parent).is_absolute():
            relative = path.parent / parent
            if relative.exists():
                parent = str(relative)
        base, _ = read_config_source(parent, folder, preset, (*_chain, source))
        raw = _deep_merge(base, raw)
    return raw, source


def load_config(
    source: str, overrides: list[str] | None = None, *, strategy_options: bool = True
) -> ExperimentConfig:
    """Load and validate a config from a YAML path or shipped scenario name, with overrides.
    The strategy's options are validated here too, through the registry (plugins from
    DLION_PLUGINS loaded): a typo is one line before any process of a job starts.
    `strategy_options=False` leaves that check (which imports the strategies, and torch) to
    the caller, for checks that must come first and fast (a torchrun world size)."""
    raw, origin = read_config_source(source)
    raw = apply_overrides(raw, overrides or [])
    cfg = config_from_dict(raw, origin)
    if strategy_options:
        check_options(cfg.strategy.name, cfg.strategy.options)
    return cfg


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], raw: dict[str, Any], origin: str) -> M:
    """`raw` as a `model` (a config, a suite); else a ConfigError naming `origin`."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{origin}: {format_validation_error(err)}") from None


def check_chosen(option: str, chosen: list[str] | None, known: list[str], *more: str) -> None:
    """A suite run restricted to `chosen` names (None: all) of `known` (or `more`)."""
    unknown = sorted(set(chosen or []) - set(known) - set(more))
    if unknown:
        raise ConfigError(f"{option}: unknown {unknown} (suite has {', '.join(known)})")


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> ExperimentConfig:
    return validated(ExperimentConfig, raw, origin)


def with_changes(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A copy of a validated config with `a.b=v` overrides applied and re-validated."""
    raw = apply_overrides(cfg.model_dump(mode="json"), overrides)
    return config_from_dict(raw, cfg.name)


def with_dynamics(cfg: ExperimentConfig, dynamics: DynamicsConfig) -> ExperimentConfig:
    """A copy of `cfg` with `dynamics` replacing its dynamics section, re-validated."""
    raw = cfg.model_dump(mode="json")
    raw["dynamics"] = dynamics.model_dump(mode="json")
    return config_from_dict(raw, cfg.name)


def with_membership(cfg: ExperimentConfig, events: list[MembershipEvent]) -> ExperimentConfig:
    """A copy of `cfg` with `events` added to its membership events, re-validated (for
    programs that draw departures, e.g. revocations of transient servers)."""
    dyn = cfg.dynamics.model_copy(update={"membership": [*cfg.dynamics.membership, *events]})
    return with_dynamics(cfg, dyn)


def write_config(out_dir: Path, cfg: BaseModel) -> Path:
    """The run's resolved config (of any kind of job), beside its metrics; its path."""
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
