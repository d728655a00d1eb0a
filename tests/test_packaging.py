"""The package as users install it: recipes/ at the top of the repository, installed with the
package, found by `ditc recipes` and `ditc run` after a plain (non-editable) `pip install .`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_list_covers_the_source_tree_and_recipes_are_one_copy():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.relative_to(ROOT).parts[:-1]) for p in (ROOT / "dit_compress").rglob("__init__.py")}
    assert set(cfg["packages"]) == found | {"dit_compress.recipes"}
    assert cfg["package-dir"]["dit_compress.recipes"] == "recipes"
    assert sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert not (ROOT / "dit_compress" / "recipes").exists()  # one copy, at the top


@pytest.mark.slow
def test_plain_pip_install_finds_and_runs_the_recipes_from_another_directory(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, DITC_NO_PROGRESS="1", HF_HUB_OFFLINE="1", PYTHONPATH="")
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import dit_compress, sys; print(dit_compress.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True)
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the installed copy, not the checkout
    ditc = str(venv / "bin" / "ditc")
    r = subprocess.run([ditc, "recipes"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "quickstart" in r.stdout and "tinydit-d14" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([ditc, "run", "quickstart", "prune_steps=2", "distill_steps=2", "samples=10", "eval_steps=2",
                        "prune.calib_samples=8", "prune.measure_cost=false", "bench.repeats=1", "--json"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "runs" / "quickstart" / "summary.md").exists()
