"""One dist worker process (one rank of a strategy job):

    python -m dlion.jobs.dist_worker CONFIG [--out DIR] [--set KEY=VALUE ...]

Started by `dlion train --engine dist` (which hosts the job's store and passes it in
DLION_STORE), or by torchrun:

    torchrun --nproc-per-node 6 -m dlion.jobs.dist_worker microcloud-hetero --out runs/dist

Under torchrun the worker reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, uses the
store torchrun's agent hosts (TORCHELASTIC_USE_AGENT_STORE), and rank 0 also runs the
coordinator that evaluates and writes metrics.jsonl and summary.json, and ends the run as
`dlion train` does (config.yaml, plot, scalars, the summary line). A WORLD_SIZE that does
not match `cluster.workers`, or bad strategy options, are one line and exit 2 on every
rank, checked before torch is imported. One difference
to know: torchrun's agent stops the whole local group when one of its processes dies
(and restarts it if --max-restarts > 0), so in-job survival of a killed worker is a
property of `dlion train --engine dist` (whose launcher leaves survivors running) and of
multi-node runs, where only the failed node's group goes.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dlion.cluster.topology import Cluster
from dlion.core.config import load_config
from dlion.core.errors import BadInput
from dlion.core.preflight import check_world_size
from dlion.core.registry import check_options

if TYPE_CHECKING:
    import torch.distributed as dist

    from dlion.core.config import ExperimentConfig

    StoreFactory = Callable[[], dist.Store]

# Under torchrun, a rank that exits with bad input waits this long first: torchrun stops
# the whole group at the first exit, and the other ranks should print their line too.
TORCHRUN_ERROR_GRACE_S = 1.0


def store_from_env(world: int, rank: int, timeout_s: float) -> tuple[StoreFactory, str, bool]:
    """(a factory of clients of the job's store, run id, launched by torchrun)."""
    import torch.distributed as dist

    from dlion.comm.job import launched_job, store_factory, store_timeout

    launched = launched_job(timeout_s)
    if launched is not None:
        return (*launched, False)
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise BadInput(
            "dlion.jobs.dist_worker: no job store: run it through "
            "`dlion train --engine dist` or torchrun"
        ) from None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "torchrun")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if not agent and rank == 0:
        # Without torchrun's agent store, rank 0 hosts it (and must outlive the job).
        master = dist.TCPStore(host, port, world, True, timeout=store_timeout(timeout_s))
        port = master.port
    return store_factory(host, port, run_id, timeout_s), run_id, True


def run(argv: list[str]) -> int:
    # Receiver and sender threads hand every message to the event loop: a short GIL switch
    # interval keeps each handoff from waiting out the default 5 ms.
    sys.setswitchinterval(0.0005)
    parser = argparse.ArgumentParser(prog="python -m dlion.jobs.dist_worker")
    parser.add_argument("config", help="YAML config path or shipped scenario name")
    parser.add_argument("--out", type=Path, default=None, help="run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--resume", action="store_true", help="start from this rank's latest checkpoint in --out"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, "engine.name=dist"], strategy_options=False)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise BadInput(
            "dlion.jobs.dist_worker: RANK and WORLD_SIZE must be set (torchrun sets them)"
        ) from None
    # Before torch is imported and any store or peer is touched: every rank fails alike,
    # with the same line, within a second.
    check_world_size(world, Cluster.from_config(cfg.cluster).size)
    check_options(cfg.strategy.name, cfg.strategy.options)
    out_dir = args.out or Path("runs") / f"{cfg.name}-{cfg.strategy.name}-dist"
    try:
        incarnation = int(os.environ.get("DLION_INCARNATION", "0"))
    except ValueError:
        raise BadInput("DLION_INCARNATION must be an integer") from None
    lead = "DLION_STORE" not in os.environ and rank == 0 and incarnation == 0
    if lead:  # torchrun's rank 0 speaks for the job on the console from the first second
        print(f"{cfg.name}: {world} workers under torchrun, loading data and model", flush=True)
    from dlion.engines.dist import DistWorker

    factory, run_id, torchrun = store_from_env(world, rank, cfg.engine.startup_timeout)
    worker = DistWorker(
        cfg,
        rank,
        factory,
        run_id=run_id,
        out_dir=out_dir,
        incarnation=incarnation,
        resume=args.resume and incarnation == 0,
    )
    coordinator_thread = None
    if torchrun and lead:
        # Under torchrun rank 0 also coordinates (admission, evaluation, the run's files).
        coordinator_thread = threading.Thread(
            target=_coordinate, args=(cfg, factory(), out_dir, run_id), name="coordinator"
        )
        coordinator_thread.start()
    say(f"rank {rank}/{world}: loaded config and data, registering")
    worker.register()
    worker.connect_peers()
    say(f"rank {rank}: connected to peers {sorted(worker.live)}")
    worker.run()
    if coordinator_thread is not None:
        coordinator_thread.join()
    return 0


def _coordinate(cfg: ExperimentConfig, store: dist.Store, out_dir: Path, run_id: str) -> None:
    """torchrun's rank 0, beside its worker: the launcher's part of the job (admission,
    evaluation, progress) and the same files and final lines as `dlion train`."""
    from dlion.core.config import write_config
    from dlion.engines.launcher import Coordinator
    from dlion.report import StartupStatus
    from dlion.report.finish import finish_run, summary_lines
    from dlion.report.metrics import warn_diverged

    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(out_dir, cfg)
    coordinator = Coordinator(cfg, store, out_dir=out_dir, run_id=run_id)
    with StartupStatus() as status:
        coordinator.wait_ready(status)
    coordinator.start()
    result = coordinator.run(progress=True)
    written = finish_run(
        result.summary, result.points, out_dir, name=cfg.name, target=cfg.train.target_acc
    )
    warn_diverged([result.summary])
    from dlion.cli.options import wide_console

    console = wide_console()
    for line in summary_lines(result.summary, out_dir, written):
        console.print(line)


def say(text: str) -> None:
    """A timestamped line in this process's log (stderr): where a slow start-up spends time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def process_main(run_process: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """Run a dist process's body with the CLI's exit codes (2 bad input or refused, 1
    failure, traceback to the log), then leave at once: receiver threads may still block
    inside the transport and must not delay the exit."""
    try:
        code = run_process(sys.argv[1:] if argv is None else argv)
    except (BadInput, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
        if "TORCHELASTIC_RUN_ID" in os.environ:
            time.sleep(TORCHRUN_ERROR_GRACE_S)
    except Exception:  # the traceback goes to this process's log
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    process_main(run)


if __name__ == "__main__":
    main()
