"""Per-iteration timelines of every worker, for sim-dist parity (RESULTS.md section 12e).

Not part of dlion: put this directory on PYTHONPATH and set DLION_TRACE=1, and every
Python process (the sim, the dist launcher and its forked workers) patches the context
so that each worker records, at the end of each iteration, a `tr` event with its clock
and the time its tasks spent since the last one: `main.compute`, `main.allreduce` (DLion's
intra-site sum), `<task>.charge` (the whole charged block), `<task>.paysleep` (the sleep
that paid it), `<task>.model` / `<task>.real` (modelled and real seconds of the work),
`<task>.recv` / `<task>.send`; `<task>` is `main` (the strategy loop), `pump` (DLion's
inter-site pumps), `io` (a send or receive gathered as a task) or the coroutine's name.
The sim writes them to metrics.jsonl, the dist workers to workers/rank-N.jsonl (wall
seconds: divide by the time scale). table.py compares the two.
"""

import os

if os.environ.get("DLION_TRACE"):
    import asyncio
    from contextlib import asynccontextmanager

    import dlion.context as C
    import dlion.engines.dist as DI
    import dlion.engines.runtime as R
    import dlion.strategies.dlion as D

    def _acc(ctx, key, dt):
        tr = ctx.__dict__.setdefault("_tr", {})
        task = asyncio.current_task()
        name = task.get_coro().__qualname__ if task else "?"
        if "_pump" in name:
            tag = "pump"
        elif "worker" in name or "strategy" in name:
            tag = "main"
        elif "wrapped" in name:
            tag = "io"  # a send or receive spawned as a task of its own (gathered)
        else:
            tag = name
        tr[f"{tag}.{key}"] = tr.get(f"{tag}.{key}", 0.0) + dt

    _charged = C.WorkerContext.charged

    @asynccontextmanager
    async def charged(self, kind, numel, ops=1):
        t0 = self.now()
        async with _charged(self, kind, numel, ops):
            yield
        _acc(self, "charge", self.now() - t0)

    C.WorkerContext.charged = charged

    def _timed(fn, key):
        async def wrapped(self, *a, **k):
            t0 = self.now()
            out = await fn(self, *a, **k)
            _acc(self, key, self.now() - t0)
            return out

        return wrapped

    C.WorkerContext.recv = _timed(C.WorkerContext.recv, "recv")
    C.WorkerContext.send = _timed(C.WorkerContext.send, "send")

    def _pay(fn):
        async def pay(self, modelled, real_s):
            t0 = self.now()
            await fn(self, modelled, real_s)
            _acc(self, "paysleep", self.now() - t0)
            _acc(self, "model", modelled)
            _acc(self, "real", real_s)

        return pay

    for cls in (R.VirtualContext, DI.DistContext):
        cls.compute = _timed(cls.compute, "compute")
        cls.pay_vector_work = _pay(cls.pay_vector_work)

    _done = C.WorkerContext.iteration_done

    def iteration_done(self, loss):
        tr = self.__dict__.get("_tr", {})
        self.record(
            "tr", it=self.iteration, now=self.now(), **{k: round(v, 6) for k, v in tr.items()}
        )
        self.__dict__["_tr"] = {}
        _done(self, loss)

    C.WorkerContext.iteration_done = iteration_done

    _sum = D.sharded_allreduce

    async def sharded_allreduce(ctx, *a, **k):
        t0 = ctx.now()
        out = await _sum(ctx, *a, **k)
        _acc(ctx, "allreduce", ctx.now() - t0)
        return out

    D.sharded_allreduce = sharded_allreduce
