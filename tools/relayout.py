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
3. Runs ruff (isort fix + format) on the rewritten Python files, since a longer module path
   can change the order of imports and the wrapping of lines.

Idempotent: a second run changes nothing (a rewrite never matches its own output; names
inside a package that an old module name became are left alone). Safe to re-run on top of
a tree where other branches added code that still uses the old names.
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
    "cli": "The `dlion` command (commands.py) and its benchmark suites (suites.py).",
    "probe": "`dlion probe`: measure step times and links, write a measured cluster.",
    "distbench": "`dlion dist ...`: benchmarks of the dist engine against the sim and DDP.",
}

TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".ini", ".txt"}
TEXT_NAMES = {"Makefile", "run"}
LEAVE_ALONE = ("benchmarks/RESULTS.md", "benchmarks/results/", "tools/relayout.py")


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
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


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
