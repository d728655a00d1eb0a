"""ditc run: recipes are checked before anything runs, chain, resume; the quickstart runs."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from dit_compress.cli import app

runner = CliRunner()


def write(tmp_path, steps, vars_=None):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "vars": vars_ or {}, "steps": steps}))
    return p


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("steps,msg", [
    ([{"name": "a", "command": "shrink", "args": {}}], "unknown command 'shrink'"),
    ([{"name": "a", "command": "info", "args": {"source": "digits-dit"}},
      {"name": "b", "command": "prune-depth", "args": {"source": "@a", "pattern": "1:2", "method": "uniform", "speed": 3}}],
     "prune-depth takes no option 'speed'"),
    ([{"name": "a", "command": "prune-depth", "args": {"source": "@later", "pattern": "1:2"}},
      {"name": "later", "command": "info", "args": {"source": "digits-dit"}}], "@later, which is not an earlier step"),
    ([{"name": "a", "command": "info", "args": {"source": "${missing}"}}], "no such variable"),
])
def test_bad_recipes_fail_before_running(tmp_path, steps, msg):
    p = write(tmp_path, steps)
    r = run("run", p, "-o", tmp_path / "run")
    assert r.exit_code == 2, r.output
    assert msg in r.stderr
    assert not (tmp_path / "run").exists()


def test_every_bundled_recipe_binds_to_its_commands(tmp_path):
    """Each built-in recipe's steps name real options of their library functions."""
    from dit_compress import pipeline as P

    names = set(P.builtin_recipes())
    assert {"quickstart", "results-loop-speed", "results-sit-depth", "tinysit-d14"} <= names
    for name in names:
        recipe, _ = P.load_recipe(name)
        bound = P.plan(P.resolve(recipe, []), tmp_path / name)
        assert len(bound) == len(recipe["steps"]) >= 1


def test_builtin_name_beside_a_directory_of_that_name(tmp_path, monkeypatch):
    """`cd runs && ditc run quickstart`: the earlier run directory 'quickstart/' is not the recipe."""
    from dit_compress import pipeline as P

    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()
    recipe, path = P.load_recipe("quickstart")
    assert path == P.builtin_recipes()["quickstart"] and recipe["name"] == "quickstart"


def test_bad_override(tmp_path):
    p = write(tmp_path, [{"name": "a", "command": "info", "args": {"source": "digits-dit"}}], {"x": 1})
    r = run("run", p, "y=3", "-o", tmp_path / "run")
    assert r.exit_code == 2 and "no variable 'y'" in r.stderr


def test_chain_and_resume(tmp_path):
    steps = [
        {"name": "p", "command": "prune-depth", "args": {"source": "digits-dit", "pattern": "${pat}", "method": "uniform"}},
        {"name": "w", "command": "add-dynamic-width", "args": {"source": "@p", "target_flops": 0.6}},
        {"name": "b", "command": "bench", "args": {"sources": ["digits-dit", "@w"], "batch_sizes": "1", "repeats": 1, "warmup": 1}},
    ]
    p = write(tmp_path, steps, {"pat": "1:2"})
    r = run("run", p, "pat=1:3", "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "w" / "config.json").read_text())
    assert cfg["depth"] == 4 and cfg["width"]["target_flops"] == 0.6
    assert yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())["vars"]["pat"] == "1:3"
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(s["speed"]) == 2
    # a rerun resumes: finished steps are skipped
    r = run("run", p, "pat=1:3", "-o", tmp_path / "run", "--json")
    assert r.exit_code == 0
    assert all(st["skipped"] for st in json.loads(r.stdout)["steps"])


def test_failing_step_stops_with_its_code(tmp_path):
    steps = [{"name": "p", "command": "prune-depth", "args": {"source": "digits-dit", "pattern": "1:5", "method": "uniform"}}]
    r = run("run", write(tmp_path, steps), "-o", tmp_path / "run")
    assert r.exit_code == 2 and "step 'p'" in r.stderr


@pytest.mark.slow
def test_quickstart_recipe_at_reduced_budget(tmp_path):
    r = run("run", "quickstart", "prune_steps=5", "distill_steps=5", "samples=20", "prune.calib_samples=16",
            "prune.measure_cost=false", "eval_steps=10", "bench.repeats=2", "-o", tmp_path / "qs", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert {q["step"] for q in s["quality"]} == {"eval-base", "eval-base-seed-1", "eval-base-seed-2", "eval-pruned"}
    assert s["fid_noise"][0]["model"] == "digits-dit" and s["fid_noise"][0]["seeds"] == 3
    assert (tmp_path / "qs" / "quality_vs_speed.png").exists()
    assert all("frechet_inception_distance" in q and "class_accuracy" in q for q in s["quality"])
    pruned = [row for row in s["speed"] if row["model"].endswith("distill")]
    assert pruned and all(row["flops_ratio"] > 1.8 for row in pruned)
    assert (tmp_path / "qs" / "summary.md").exists()
