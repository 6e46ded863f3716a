"""The command's entry points and start-up cost (issues 15 item 7, 18 item 4): --version,
`python -m dlion`, and `dlion --help` / `dlion strategies` without importing torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import dlion
from dlion.cli.commands import BUILTIN_STRATEGIES, LAZY_GROUPS, load_group, main

ROOT = Path(__file__).parent.parent


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_version_matches_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"dlion {dlion.__version__}\n"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == dlion.__version__


def test_python_m_dlion_is_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dlion", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout == f"dlion {dlion.__version__}\n"
    bad = subprocess.run(
        [sys.executable, "-m", "dlion", "nosuch"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "No such command 'nosuch'" in bad.stderr


@pytest.mark.parametrize("argv", [["--help"], ["strategies"], ["--version"], ["fl", "--help"]])
def test_help_and_listing_do_not_import_torch(argv: list[str]) -> None:
    # `dlion fl --help` imports the fl group (which needs torch) only because it is asked for.
    code = (
        "import sys\nfrom dlion.cli.commands import main\n"
        f"rc = main({argv!r})\n"
        "print('TORCH', 'torch' in sys.modules, 'RC', rc)"
    )
    proc = run_python(code)
    expect_torch = argv[0] == "fl"
    assert f"TORCH {expect_torch} RC 0" in proc.stdout, proc.stderr[-2000:]


def test_builtin_strategy_list_is_the_registry() -> None:
    from dlion.core.registry import BUILTIN, REGISTRY, load_builtins

    load_builtins()
    registry = [(s.name, s.summary) for s in REGISTRY.values() if s.name in BUILTIN]
    assert list(BUILTIN_STRATEGIES) == registry


def test_plugins_are_listed_from_the_registry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlion import strategies
    from dlion.core import registry

    monkeypatch.setenv("DLION_PLUGINS", "dist_plugins")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    before = dict(strategies.REGISTRY)
    loaded = "dist_plugins" in sys.modules
    try:
        assert main(["strategies"]) == 0
    finally:  # other tests list the registry or load the plugin: leave all as it was
        for name in set(strategies.REGISTRY) - set(before):
            del strategies.REGISTRY[name]
        if not loaded:
            sys.modules.pop("dist_plugins", None)
            registry._plugins_loaded.discard("dist_plugins")
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("t-liar") and line.endswith("(plugin)") for line in lines)


@pytest.mark.parametrize("lazy", LAZY_GROUPS, ids=[g.name for g in LAZY_GROUPS])
def test_lazy_group_descriptions_match_the_real_groups(lazy: object) -> None:
    command = load_group(lazy)  # type: ignore[arg-type]
    real = (command.help or "").strip().split("\n")[0]
    assert real == lazy.help  # type: ignore[attr-defined]
    assert command.name == lazy.name  # type: ignore[attr-defined]


def test_readme_says_nothing_is_unbuilt() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "Not built yet" not in readme and "not built yet" not in readme
