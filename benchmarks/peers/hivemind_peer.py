"""One Hivemind peer training a dlion config: the same model, data shard, global batch,
learning rate, target and emulated machine as rank R of `dlion train CONFIG --engine dist`.

Hivemind (https://github.com/learning-at-home/hivemind) is the real peer we compare
against: `hivemind.Optimizer` accumulates gradients locally until the peers together have
processed `target_batch_size` samples, then matchmakes a group over its DHT, averages the
gradients (butterfly all-reduce) and takes one step of the wrapped optimizer. With
`target_batch_size` = the config's global batch and the wrapped optimizer = the config's SGD
(lr, momentum, weight decay), one Hivemind epoch is one synchronous-SGD step at the same
global batch as dlion's `allreduce` and `ideal`; faster peers contribute more samples to it,
which is Hivemind's own way of not waiting for the slowest.

The machine is emulated as dlion's dist engine does it (engines/dist.py `compute`): each
step is the real gradient plus a sleep to `time_scale x cluster.compute_time(rank, FLOPs)`,
so the peer runs at the config's speed for that rank. Links are whatever the process
runs on: inside `dlion netns` namespaces they are the kernel-shaped site pipes. Latency is
not added (dlion's transport adds it in-process; Hivemind has no such hook): that
flatters Hivemind.

Written for `benchmarks/peers/compare.py`, which starts one per namespace; a peer logs
`{"t": scenario s, "epoch": .., "acc": ..}` lines from a common start once all peers are
up and rank 0 evaluates after every epoch
(the models are identical after an epoch) and writes `done` when the target is reached.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from functools import partial
from pathlib import Path

import hivemind
import numpy as np
import torch
from hivemind.compression import Float16Compression, NoCompression

from dlion.cluster.topology import Cluster
from dlion.core.config import load_config
from dlion.training.experiment import Prepared, prepare


def accuracy(model: torch.nn.Module, prep: Prepared) -> float:
    model.eval()
    with torch.no_grad():
        x, y = prep.test.batch(torch.arange(len(prep.test)))
        out = model(x)
        value = float(prep.objective.metric(out, y))
    model.train()
    return value


def wait_for(path: Path, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:g} s")
        time.sleep(0.05)
    return path.read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1", help="address this peer listens on")
    ap.add_argument("--dir", type=Path, required=True, help="shared folder of the run")
    ap.add_argument("--world", type=int, required=True, help="number of peers")
    ap.add_argument("--matchmaking-time", type=float, default=1.0)
    ap.add_argument("--averaging-timeout", type=float, default=30.0)
    ap.add_argument("--fp16", action="store_true", help="send gradients as float16")
    ap.add_argument(
        "--average-state-every",
        type=int,
        default=1,
        help="epochs between hivemind's background averaging of parameters and optimizer "
        "state (hivemind's default 1; gradients are averaged every epoch regardless)",
    )
    ap.add_argument(
        "--chunk-timeout", type=float, default=None, help="hivemind's next_chunk_timeout (s)"
    )
    args = ap.parse_args()

    torch.set_num_threads(1)
    cfg = load_config(args.config, args.sets)
    scale = cfg.engine.time_scale
    cluster = Cluster.from_config(cfg.cluster).with_dynamics(cfg.dynamics, cfg.train.max_time)
    prep = prepare(cfg, cluster.size)
    model = copy.deepcopy(prep.template)
    shard = np.asarray(prep.shards[args.rank], dtype=np.int64)
    rng = np.random.default_rng(cfg.train.seed * 1000 + args.rank)
    batch = cfg.train.batch_per_worker

    # Rank 0 starts the DHT; the others join it through the address it writes.
    maddr_file = args.dir / "dht-maddr"
    host_maddrs = [f"/ip4/{args.host}/tcp/0"]
    if args.rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=host_maddrs)
        tmp = maddr_file.with_suffix(".tmp")
        tmp.write_text(str(dht.get_visible_maddrs()[0]))
        tmp.rename(maddr_file)
    else:
        initial = wait_for(maddr_file, 60.0)
        dht = hivemind.DHT(start=True, host_maddrs=host_maddrs, initial_peers=[initial])
    t = cfg.train
    compression = Float16Compression() if args.fp16 else NoCompression()
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=f"dlion-peer-{cfg.name}",
        params=model.parameters(),
        optimizer=partial(
            torch.optim.SGD, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        ),
        batch_size_per_step=batch,
        target_batch_size=batch * cluster.size,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        next_chunk_timeout=args.chunk_timeout,
        average_state_every=args.average_state_every,
        grad_compression=compression,
        # hivemind warns unless its per-request timeout is below the matchmaking time.
        averager_opts={"request_timeout": min(3.0, args.matchmaking_time / 2)},
        verbose=False,
    )

    log = (args.dir / f"peer-{args.rank}.jsonl").open("w")
    done = args.dir / "done"
    flops = prep.flops_per_sample * batch
    # A common start once every peer is up (start-up excluded, as dlion's dist engine
    # starts its clock after rendezvous): each writes ready-R, and all start 2 s after
    # the last of those files appeared.
    (args.dir / f"ready-{args.rank}").write_text("")
    readies = [args.dir / f"ready-{r}" for r in range(args.world)]
    for path in readies:
        wait_for(path, 300.0)
    t0 = max(p.stat().st_mtime for p in readies) + 2.0
    time.sleep(max(0.0, t0 - time.time()))
    epoch, steps = opt.local_epoch, 0

    def now() -> float:  # scenario seconds since the common start
        return (time.time() - t0) / scale

    log.write(json.dumps({"t": now(), "epoch": epoch, "acc": accuracy(model, prep)}) + "\n")
    while now() < t.max_time and not done.exists():
        start = time.perf_counter()
        idx = torch.from_numpy(rng.choice(shard, size=batch, replace=len(shard) < batch))
        x, y = prep.train.batch(idx)
        loss = prep.objective.loss(model(x), y)
        loss.backward()
        measured = time.perf_counter() - start
        target = scale * cluster.compute_time(args.rank, flops, start=now())
        if target > measured:
            time.sleep(target - measured)
        opt.step()
        opt.zero_grad()
        steps += 1
        if opt.local_epoch != epoch:
            epoch = opt.local_epoch
            row = {"t": now(), "epoch": epoch, "steps": steps}
            if args.rank == 0:
                row["acc"] = accuracy(model, prep)
                if row["acc"] >= t.target_acc and t.stop_at_target:
                    done.write_text(f"{row['t']}\n")
            log.write(json.dumps(row) + "\n")
            log.flush()
    end = {"t": now(), "epoch": opt.local_epoch, "steps": steps, "end": True}
    log.write(json.dumps(end) + "\n")
    log.close()
    opt.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main()
