"""One dist worker process: `python -m dlion.worker CONFIG [--out DIR] [--set KEY=VALUE ...]`.

Started by `dlion train --engine dist` (which hosts the job's store and passes it in
DLION_STORE), or by torchrun:

    torchrun --nproc-per-node 6 -m dlion.worker microcloud-hetero --out runs/dist

Under torchrun the worker reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, uses the
store torchrun's agent hosts (TORCHELASTIC_USE_AGENT_STORE), and rank 0 also runs the
coordinator that evaluates and writes metrics.jsonl and summary.json. One difference
to know: torchrun's agent stops the whole local group when one of its processes dies
(and restarts it if --max-restarts > 0), so in-job survival of a killed worker is a
property of `dlion train --engine dist` (whose launcher leaves survivors running) and of
multi-node runs, where only the failed node's group goes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from dlion.config import load_config
from dlion.engines.dist import DistWorker, job_store
from dlion.errors import BadInput
from dlion.strategies import load_plugins

StoreFactory = Callable[[], dist.Store]


def _store_from_env(world: int, rank: int, timeout_s: float) -> tuple[StoreFactory, str, bool]:
    """(a factory of clients of the job's store, run id, launched by torchrun)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "DLION_STORE" in os.environ:
        host, _, port_text = os.environ["DLION_STORE"].rpartition(":")
        port = int(port_text)
        run_id = os.environ["DLION_RUN_ID"]
        torchrun = False
    else:
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError):
            raise BadInput(
                "dlion.worker: no job store: run it through `dlion train --engine dist` or torchrun"
            ) from None
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "torchrun")
        torchrun = True
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        if not agent and rank == 0:
            # Without torchrun's agent store, rank 0 hosts it (and must outlive the job).
            master = dist.TCPStore(host, port, world, True, timeout=timeout)
            port = master.port

    def factory() -> dist.Store:
        client = dist.TCPStore(host, port, None, False, timeout=timeout)
        return job_store(client, run_id)

    return factory, run_id, torchrun


def run(argv: list[str]) -> int:
    # Receiver and sender threads hand every message to the event loop: a short GIL switch
    # interval keeps each handoff from waiting out the default 5 ms.
    sys.setswitchinterval(0.0005)
    load_plugins()
    parser = argparse.ArgumentParser(prog="python -m dlion.worker")
    parser.add_argument("config", help="YAML config path or shipped scenario name")
    parser.add_argument("--out", type=Path, default=None, help="run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--resume", action="store_true", help="start from this rank's latest checkpoint in --out"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, "engine.name=dist"])
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise BadInput(
            "dlion.worker: RANK and WORLD_SIZE must be set (torchrun sets them)"
        ) from None
    out_dir = args.out or Path("runs") / f"{cfg.name}-{cfg.strategy.name}-dist"
    factory, run_id, torchrun = _store_from_env(world, rank, cfg.engine.startup_timeout)
    try:
        incarnation = int(os.environ.get("DLION_INCARNATION", "0"))
    except ValueError:
        raise BadInput("DLION_INCARNATION must be an integer") from None
    worker = DistWorker(
        cfg,
        rank,
        factory,
        run_id=run_id,
        out_dir=out_dir,
        incarnation=incarnation,
        resume=args.resume and incarnation == 0,
    )
    if world != worker.cluster.size:
        raise BadInput(
            f"WORLD_SIZE={world} but the config describes {worker.cluster.size} workers "
            "(cluster.workers)"
        )
    coordinator_thread = None
    if torchrun and rank == 0 and incarnation == 0:
        # Under torchrun rank 0 also coordinates (admission, evaluation, the run's files).
        from dlion.engines.launcher import Coordinator

        coordinator = Coordinator(cfg, factory(), out_dir=out_dir, run_id=run_id)

        def coordinate() -> None:
            coordinator.wait_ready()
            coordinator.start()
            coordinator.run(progress=sys.stdout.isatty())

        coordinator_thread = threading.Thread(target=coordinate, name="coordinator")
        coordinator_thread.start()
    say(f"rank {rank}/{world}: loaded config and data, registering")
    worker.register()
    worker.connect_peers()
    say(f"rank {rank}: connected to peers {sorted(worker.live)}")
    worker.run()
    if coordinator_thread is not None:
        coordinator_thread.join()
    return 0


def say(text: str) -> None:
    """A timestamped line in this process's log (stderr): where a slow start-up spends time."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def process_main(run_process: Callable[[list[str]], int]) -> None:
    """Run a dist process's body with the CLI's exit codes (2 bad input or refused, 1
    failure, traceback to the log), then leave at once: receiver threads may still block
    inside the transport and must not delay the exit."""
    try:
        code = run_process(sys.argv[1:])
    except (BadInput, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
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
