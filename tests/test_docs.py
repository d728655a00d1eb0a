"""The front door stays true: the README is short and its commands parse as written, the command
reference is the app's own help, and the documentation site builds with no broken link."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from dit_compress.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "scripts" / "gen_cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_command_reference_is_the_apps_help():
    gen = _generator()
    assert (ROOT / "docs" / "reference" / "cli.md").read_text() == gen.render(), (
        "docs/reference/cli.md is not current: run python scripts/gen_cli_reference.py")
    group = typer.main.get_command(app)
    text = gen.render()
    for name in group.list_commands(None):  # every command and every one of its options is there
        assert f"## `ditc {name}`" in text
        for p in group.get_command(None, name).params:
            if p.param_type_name == "option":
                assert f"`{p.opts[0]}`" in text, (name, p.opts)


def readme_commands() -> list[list[str]]:
    """Each `ditc ...` command of the README's bash blocks, as argv (continuations joined, `&&`
    chains split, comments dropped; `accelerate launch ... -m dit_compress.cli` counted as ditc)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in (p.strip() for p in line.split("&&")):
                argv = shlex.split(part) if part else []
                if "dit_compress.cli" in argv:
                    argv = ["ditc", *argv[argv.index("dit_compress.cli") + 1:]]
                if argv[:1] == ["ditc"]:
                    out.append(argv[1:])
    return out


def test_the_readme_is_short_and_its_commands_parse_as_written():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    cmds = readme_commands()
    assert len(cmds) >= 10
    group = typer.main.get_command(app)
    for argv in cmds:
        cmd = group.get_command(None, argv[0])
        assert cmd is not None, argv
        cmd.make_context(argv[0], list(argv[1:]))  # unknown options, wrong types, missing arguments raise


def test_the_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_documentation_site_builds_strictly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                                 "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
