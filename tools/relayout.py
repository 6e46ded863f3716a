"""Package layout pass of issue 19: move modules into subpackages and rewrite every reference.

Usage (from the repository root, on a clean or committed tree):

    python3 tools/relayout.py            # move, rewrite, then ruff (imports sorted, formatted)
    python3 tools/relayout.py --check    # only say what would move; exit 1 if anything would
    python3 tools/relayout.py --no-ruff  # move and rewrite, leave formatting alone

What it does, in order:
1. `git mv` each module of MOVES to its new place (a missing source whose target already
   exists counts as done; a source and target both present, or both missing, is an error);
   creates the new packages' `__init__.py` (a one-line docstring each).
2. Rewrites every reference to a moved module in the files git knows (tracked, or untracked
   and not ignored): dotted names anywhere in the text (`import dlion.x`, `from dlion.x
   import`, `mock.patch("dlion.x.y")`, `python -m dlion.x`, `pkg.module:fn` plugin paths,
   pyproject entry points), `from dlion import x` of a moved module, and file paths
   (`src/dlion/x.py`, `dlion/x.py`, `fl/dist.py`). Recorded results are left as they were
   (benchmarks/RESULTS.md, benchmarks/results/), and so is this script.
3. Writes README.md's Layout section (LAYOUT below) to match the new tree.
4. Runs ruff (isort fix + format) on the rewritten Python files, since a longer module path
   can change the order of imports and the wrapping of lines, and lists the docstring and
   comment lines that grew past the line limit (rewrap those by hand).

Idempotent: a second run changes nothing (a rewrite never matches its own output; names
inside a package that an old module name became are left alone). Safe to re-run on top of
a tree where other branches added code that still uses the old names. One consequence: a
bare `dlion.cli`, `dlion.cluster`, `dlion.probe` or `dlion.distbench` always reads as the
old module, so new code names the module inside (`dlion.cli.commands`, ...).
"""

from __future__ import annotations

import argparse
import io
import itertools
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "src/dlion"

# old module (dotted, under dlion) -> new module. Kept in place on purpose: api.py and
# __init__.py (the public API), context.py, engines/, strategies/, fl/, comm/ (the
# import-boundary checker names them), and the application packages.
MOVES: dict[str, str] = {
    # core: what every part uses (config and its loading, the registry, user code, errors)
    "config": "core.config",
    "registry": "core.registry",
    "usercode": "core.usercode",
    "strict_yaml": "core.strict_yaml",
    "errors": "core.errors",
    "outdir": "core.outdir",
    "timescale": "core.timescale",
    "checkpoint": "core.checkpoint",
    "preflight": "core.preflight",
    # training: one replica's model, objective, optimizer, and what a run prepares
    "models": "training.models",
    "objective": "training.objective",
    "optim": "training.optim",
    "replica": "training.replica",
    "experiment": "training.experiment",
    "model_io": "training.model_io",
    # cluster: the simulated micro-cloud (sites, links, traces, membership, vector costs)
    "cluster": "cluster.topology",
    "traces": "cluster.traces",
    "dynamics": "cluster.dynamics",
    "vector_cost": "cluster.vector_cost",
    "vector_cost_host": "cluster.vector_cost_host",
    # cli: the `dlion` command and its benchmark suites
    "cli": "cli.commands",
    "bench": "cli.suites",
    "cli_options": "cli.options",
    # probe: `dlion probe` (method, command, the link-measuring process)
    "probe": "probe.measure",
    "probe_cli": "probe.cli",
    "probe_worker": "probe.link_process",
    # distbench: `dlion dist ...` (the command group and the benchmarks it runs)
    "dist_cli": "distbench.cli",
    "distbench": "distbench.runs",
    # jobs: where an engine meets an algorithm family; "worker" is one rank of a strategy
    "worker": "jobs.dist_worker",
    # FL on real processes: no second file called dist.py
    "fl.dist": "fl.processes",
}

NEW_PACKAGES: dict[str, str] = {
    "core": "What every part of dlion uses: config, registry, user code, errors, outputs.",
    "training": "One replica's model, objective and optimizer, and what a run prepares.",
    "cluster": "The simulated micro-cloud: sites, links, traces, membership, vector costs.",
    "cli": "The `dlion` command (commands.py), its suites (suites.py), shared options.",
    "probe": "`dlion probe`: measure step times and links, write a measured cluster.",
    "distbench": "`dlion dist ...`: benchmarks of the dist engine against the sim and DDP.",
}

TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".ini", ".txt"}
TEXT_NAMES = {"Makefile", "run"}
LEAVE_ALONE = ("benchmarks/RESULTS.md", "benchmarks/results/", "tools/relayout.py")


# README.md's Layout section: the tree as it stands after the moves.
LAYOUT = """\
src/dlion/
  __init__.py, api.py  the public API: dlion.run, dlion.load_model, dlion.register_strategy
  __main__.py          `python -m dlion`: the `dlion` command
  context.py           the WorkerContext API strategies are written against, its public
                       engine side, and worker_setup (what any engine tells a worker)
  core/                what every part uses: config.py (typed config, YAML, --set
                       overrides, one-line errors), registry.py (strategies and FL
                       algorithms by name, built-ins and plugins; options checked when the
                       config loads), usercode.py ("pkg.module:fn" from the config),
                       checkpoint.py (atomic, verified checkpoints for the sim, dist
                       workers and the FL server), timescale.py (scenario <-> wall time),
                       preflight.py (checks before any process starts), errors.py,
                       strict_yaml.py, outdir.py (output directories)
  training/            one worker's model: models.py (mlp, cnn, user builders; FLOPs),
                       objective.py (loss, metric), optim.py (optimizers, schedules),
                       replica.py (flat parameters + buffers, shard, step, evaluation),
                       experiment.py (what a run prepares; the saved model), model_io.py
                       (DIR/model.safetensors)
  cluster/             the simulated micro-cloud: topology.py (workers, sites, links,
                       site pipes, NICs; capacity and bandwidth traces), traces.py,
                       dynamics.py (membership schedule), vector_cost.py (what vector work
                       besides the gradient costs; fitted per kind on a host:
                       vector_cost_host.py)
  data/                digits, mnist1d, synthetic; IDX/CIFAR/npz readers; partitioners;
                       examples.py: batches read by index (tensors or a user's Dataset)
  comm/                typed messages with encoded sizes; wire codec; ring all-reduce;
                       transport.py pair groups, shaping.py link pacing, delivery.py when
                       a send on a real link has crossed, job.py a job's store keys,
                       shared-secret admission and process reaping, peer_process.py one
                       process of a job (loop, monitor, heartbeats, links), shared by the
                       dist engine and FL on real processes
  engines/             imports no algorithm: runtime.py runs a job (a population of
                       coroutines) on the virtual-time loop (virtual_loop.py) and network
                       model (network.py); sim.py is the strategy job on it
                       (sim_checkpoint.py: verified replay); dist engine (dist.py worker
                       side, collective.py, dist_checkpoint.py, launcher.py job side,
                       forkserver.py worker start-up, netns.py namespaces + tc)
  jobs/                where an engine meets an algorithm family it may not import:
                       fl_sim.py (the FL server and clients on the virtual runtime),
                       dist_worker.py (`python -m dlion.jobs.dist_worker`: one dist worker,
                       own launcher or torchrun)
  strategies/          one file per algorithm (dlion, dlion_hpdc21, allreduce, ps, gaia, ako,
                       hop, adpsgd, diloco, streaming_diloco, sparseloco, halos; wdb.py);
                       __init__.py registers the built-ins; a strategy's `worker` is one rank
  fl/                  federated learning, engine-free: algorithms (one file each),
                       roles.py (server and client behaviours), job.py (model, replicas,
                       star network, partition), processes.py (real processes, `dlion fl
                       serve` / `dlion fl client`), checkpoint.py (server state on
                       core/checkpoint.py), bench.py, cli.py
  cli/                 commands.py (the `dlion` command), suites.py (`dlion bench`: suites
                       side by side, with a report), options.py (options every group shares)
  probe/               `dlion probe`: measure.py (step-time model and links, the method),
                       cli.py, link_process.py (one process of the link measurement)
  distbench/           `dlion dist ...`: runs.py (parity with the sim, DDP overhead,
                       faults, kernel shaping), cli.py
  report/              metrics log, TTA, tables, plots, progress and start-up status,
                       scalars (CSV, TensorBoard), a finished run's files and lines, compare
  transient/           training on transient servers: catalog, revocations, cost, planner
  hybrid/, transfer/, thermal/   the other systems, each with its CLI group
  scenarios/           shipped presets (homogeneous, compute-hetero, network-hetero,
                       microcloud-hetero and its non-IID and 12/24/32-worker variants,
                       microcloud-dynamic)
  suites/              shipped benchmark suites (quick, headline, paper, fl)
  thermal_profiles/, transient_catalogs/   their shipped device profiles and catalogs
benchmarks/RESULTS.md  measured figures with the command, machine and date
tools/relayout.py      the package layout pass (issue 19), re-runnable on a merged tree
tests/                 pytest; `make test` runs the fast set, `make test-all` adds slow and
                       timing cases
"""


# Lines the rewrite pushes past ruff's limit, rewrapped (file, rewritten text, wrapped text).
FIXUPS: list[tuple[str, str, str]] = [
    (
        "src/dlion/hybrid/cli.py",
        "which `dlion.cli.commands.main` turns into one line.",
        "which `dlion.cli.commands.main` turns\ninto one line.",
    ),
    (
        "src/dlion/jobs/dist_worker.py",
        '"""One dist worker process: `python -m dlion.jobs.dist_worker CONFIG [--out DIR] '
        "[--set KEY=VALUE ...]`.",
        '"""One dist worker process (one rank of a strategy job):\n\n'
        "    python -m dlion.jobs.dist_worker CONFIG [--out DIR] [--set KEY=VALUE ...]",
    ),
    (
        "src/dlion/jobs/dist_worker.py",
        '"dlion.jobs.dist_worker: no job store: run it through `dlion train --engine dist` '
        'or torchrun"',
        '"dlion.jobs.dist_worker: no job store: run it through "\n'
        '            "`dlion train --engine dist` or torchrun"',
    ),
    (
        "tests/test_models.py",
        '"""Tests for dlion.training.models: shapes, deterministic init, FLOP counting, '
        'trainability, errors."""',
        '"""Tests for dlion.training.models: shapes, deterministic init, FLOP counting,\n'
        'trainability, errors."""',
    ),
]


class RelayoutError(Exception):
    """The tree is not in a state the moves can start from."""


def module_path(dotted: str) -> Path:
    return Path(PKG, *dotted.split(".")).with_suffix(".py")


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return out.stdout


def plan_moves() -> list[tuple[str, str]]:
    """The moves still to do; RelayoutError if a move is neither done nor doable."""
    todo = []
    for old, new in MOVES.items():
        src, dst = ROOT / module_path(old), ROOT / module_path(new)
        if src.exists() and dst.exists():
            raise RelayoutError(f"both {module_path(old)} and {module_path(new)} exist")
        if src.exists():
            todo.append((old, new))
        elif not dst.exists():
            raise RelayoutError(f"{module_path(old)} is missing (and {module_path(new)} too)")
    return todo


def do_moves(todo: list[tuple[str, str]]) -> None:
    # cli.py and the package cli/ may stand side by side until cli.py has moved into it.
    for old, new in todo:
        dst = ROOT / module_path(new)
        dst.parent.mkdir(parents=True, exist_ok=True)
        git("mv", str(module_path(old)), str(module_path(new)))
    for pkg, doc in NEW_PACKAGES.items():
        init = ROOT / PKG / pkg / "__init__.py"
        if not init.exists():
            init.write_text(f'"""{doc}"""\n')
            git("add", str(init.relative_to(ROOT)))


def children(old: str) -> set[str]:
    """Names inside the package that `old` became (cli -> {commands, suites}): `dlion.cli.commands`
    is already a new name, never an attribute of the old module."""
    return {
        new[len(old) + 1 :].split(".")[0] for new in MOVES.values() if new.startswith(old + ".")
    }


def rewriters() -> list[tuple[re.Pattern[str], str]]:
    rules: list[tuple[re.Pattern[str], str]] = []
    # Longest first, so fl.dist is rewritten before a (hypothetical) fl.
    for old, new in sorted(MOVES.items(), key=lambda kv: -len(kv[0])):
        kids = "|".join(sorted(children(old)))
        # Not dlion.cli.commands, nor `from dlion.cli import commands`: already the new layout.
        skip = f"(?!\\.(?:{kids})\\b)(?!\\s+import\\s+\\(?\\s*(?:{kids})\\b)" if kids else ""
        # Dotted: dlion.old, not inside a longer name, not followed by a word character.
        dotted = re.compile(rf"(?<![\w.])dlion\.{re.escape(old)}(?!\w){skip}")
        rules.append((dotted, f"dlion.{new}"))
        # Paths: (src/)dlion/old.py, and for modules in a subpackage also pkg/old.py.
        old_path, new_path = old.replace(".", "/") + ".py", new.replace(".", "/") + ".py"
        rules.append(
            (
                re.compile(rf"(?<![\w/.])((?:src/)?dlion/){re.escape(old_path)}\b"),
                rf"\g<1>{new_path}",
            )
        )
        # A quoted file name alone ("cluster.py", as in `root / "dlion" / "cluster.py"`).
        rules.append((re.compile(rf"(?<=[\"']){re.escape(old_path)}(?=[\"'])"), new_path))
        if "." in old:
            rules.append((re.compile(rf"(?<![\w/.]){re.escape(old_path)}\b"), new_path))
    return rules


FROM_DLION = re.compile(r"^(?P<indent>[ \t]*)from dlion import (?P<names>[^()\n#]+?)[ \t]*$", re.M)


def split_from_dlion(match: re.Match[str]) -> str:
    """`from dlion import probe as p, __version__` -> one line per moved module."""
    indent, kept, lines = match["indent"], [], []
    for item in match["names"].split(","):
        name, _, alias = (part.strip() for part in item.strip().partition(" as "))
        if name in MOVES:
            parent, _, leaf = f"dlion.{MOVES[name]}".rpartition(".")
            as_ = f" as {alias or name}" if (alias or name) != leaf else ""
            lines.append(f"{indent}from {parent} import {leaf}{as_}")
        else:
            kept.append(item.strip())
    if kept:
        lines.insert(0, f"{indent}from dlion import {', '.join(kept)}")
    return "\n".join(lines)


def text_files() -> list[Path]:
    names = git("ls-files", "-co", "--exclude-standard").splitlines()
    out = []
    for name in names:
        if name.startswith(LEAVE_ALONE):
            continue
        path = ROOT / name
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
            out.append(path)
    return out


HIDDEN = "dli\x00n"  # as long as "dlion", matched by no rule


def hide_local_names(text: str) -> str:
    """A module without `import dlion` that writes `dlion.worker` in code means a name of
    its own (strategies/__init__.py: the dlion strategy's module): hide those from the
    rules. Strings, comments and import lines are always rewritten."""
    if re.search(r"^\s*import dlion\s*$", text, re.M):
        return text
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    lines = text.splitlines()
    out = text
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for tok, nxt in itertools.pairwise(tokens):
        row, col = tok.start
        if (
            tok.type == tokenize.NAME
            and tok.string == "dlion"
            and nxt.string == "."
            and not lines[row - 1].lstrip().startswith(("import ", "from "))
        ):
            at = starts[row - 1] + col
            out = out[:at] + HIDDEN + out[at + len(HIDDEN) :]
    return out


def rewrite(paths: list[Path]) -> list[Path]:
    rules = rewriters()
    changed = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        new = hide_local_names(text) if path.suffix == ".py" else text
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if path.suffix == ".py":
            new = FROM_DLION.sub(split_from_dlion, new).replace(HIDDEN, "dlion")
        for name, long, wrapped in FIXUPS:
            if path == ROOT / name:
                new = new.replace(long, wrapped)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def write_layout() -> bool:
    """Put LAYOUT in README.md's `## Layout` code block; True if that changed the file."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    match = re.search(r"^## Layout\n\n```\n(.*?)^```\n", text, re.M | re.S)
    if match is None:
        raise RelayoutError("README.md has no `## Layout` section with a ``` block")
    new = text[: match.start(1)] + LAYOUT + text[match.end(1) :]
    readme.write_text(new, encoding="utf-8")
    return new != text


def run_ruff(paths: list[Path]) -> None:
    venv = ROOT / ".venv" / "bin" / "ruff"
    ruff = str(venv) if venv.exists() else shutil.which("ruff")
    if ruff is None:
        raise RelayoutError("ruff not found (make setup, or pass --no-ruff)")
    files = [str(p) for p in paths if p.suffix == ".py"]
    if files:
        subprocess.run(
            [ruff, "check", "--select", "I", "--fix", "-q", *files], cwd=ROOT, check=True
        )
        subprocess.run([ruff, "format", "-q", *files], cwd=ROOT, check=True)
        # A longer module path in a docstring or comment can pass the line limit: say where.
        long = subprocess.run([ruff, "check", "--select", "E501", "-q", *files], cwd=ROOT)
        if long.returncode:
            print("relayout: rewrap the lines above by hand (prose ruff cannot wrap)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="say what would move; change nothing")
    parser.add_argument("--no-ruff", action="store_true", help="skip ruff's import sort + format")
    args = parser.parse_args(argv)
    try:
        todo = plan_moves()
        if args.check:
            for old, new in todo:
                print(f"would move {module_path(old)} -> {module_path(new)}")
            return 1 if todo else 0
        do_moves(todo)
        changed = rewrite(text_files())
        if write_layout() and ROOT / "README.md" not in changed:
            changed.append(ROOT / "README.md")
        if not args.no_ruff:
            run_ruff(changed)
    except RelayoutError as exc:
        print(f"relayout: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"relayout: {' '.join(exc.cmd)} failed:\n{exc.stderr or ''}", file=sys.stderr)
        return 2
    print(f"relayout: {len(todo)} modules moved, {len(changed)} files rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
