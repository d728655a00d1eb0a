"""The recipe boundary: a recipe's steps stay inside their run directory, are checked (names,
outputs, values, collisions) before anything runs, and a rerun resumes or refuses, never mixes."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from dit_compress.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def recipe(tmp_path, steps, vars_=None, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"name": "t", "vars": vars_ or {}, "steps": steps}))
    return p


def refused(r, text):
    assert r.exit_code == 2, r.output
    assert text in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.output, r.stderr


PRUNE = {"command": "prune-depth", "args": {"source": "digits-dit", "pattern": "1:2", "method": "uniform"}}


@pytest.mark.parametrize("name,text", [("/victim", "plain name"), ("../victim", "plain name"), (".", "plain name"),
                                       ("..", "plain name"), ("a/b", "plain name"), (123, "must be text"),
                                       (None, "must be text")])
def test_step_names_stay_in_the_run_directory(tmp_path, name, text):
    """Items 2 and 10: a step named /dir, ../x or '.', with force, replaced what it named;
    names 123 or null raised tracebacks."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    step = {"name": name, **PRUNE, "args": {**PRUNE["args"], "force": True}}
    refused(run("run", recipe(tmp_path, [step]), "-o", tmp_path / "run"), text)
    assert (victim / "keep").read_text() == "mine" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("output", ["{victim}", "../victim", ".", "", "/tmp"])
def test_explicit_outputs_are_confined(tmp_path, output):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    step = {"name": "p", **PRUNE, "args": {**PRUNE["args"], "force": True, "output": output.format(victim=victim)}}
    refused(run("run", recipe(tmp_path, [step]), "-o", tmp_path / "run"), "inside the run directory")
    assert (victim / "keep").read_text() == "mine" and not (tmp_path / "run").exists()


def test_collisions_and_bad_values_are_found_before_anything_runs(tmp_path):
    """Items 10 and 13: two steps writing one output, a list for a single value: refused in
    the plan, so the first step never ran."""
    first = {"name": "a", **PRUNE}
    clash = {"name": "b", **PRUNE, "args": {**PRUNE["args"], "output": "a"}}
    refused(run("run", recipe(tmp_path, [first, clash]), "-o", tmp_path / "run"), "write the same output")
    inside = {"name": "b", **PRUNE, "args": {**PRUNE["args"], "output": "a/inner"}}
    refused(run("run", recipe(tmp_path, [first, inside]), "-o", tmp_path / "run"), "write the same output")
    listy = {"name": "b", **PRUNE, "args": {**PRUNE["args"], "seed": [1, 2]}}
    refused(run("run", recipe(tmp_path, [first, listy]), "-o", tmp_path / "run"), "takes a single value")
    refused(run("run", recipe(tmp_path, [first]), "-o", ""), "give the run its own directory")
    assert not (tmp_path / "run").exists()


def test_explicit_output_is_seen_as_finished_and_changes_are_refused_or_forced(tmp_path):
    """Item 13 and the stale case: a step with an explicit output is finished on a rerun; a
    finished step whose options changed is refused in one line, and --force recomputes it
    and the step that reads it."""
    steps = [{"name": "p", **PRUNE, "args": {**PRUNE["args"], "pattern": "${pat}", "output": "models/pruned"}},
             {"name": "i", "command": "add-token-router", "args": {"source": "@p"}}]
    p = recipe(tmp_path, steps, {"pat": "1:2"})
    r = run("run", p, "-o", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "models" / "pruned" / "config.json").read_text())["depth"] == 6
    r = run("run", p, "-o", tmp_path / "run", "--json")
    assert r.exit_code == 0 and all(s["skipped"] for s in json.loads(r.stdout)["steps"]), r.output
    refused(run("run", p, "pat=1:3", "-o", tmp_path / "run"), "finished earlier with other options")
    assert json.loads((tmp_path / "run" / "models" / "pruned" / "config.json").read_text())["depth"] == 6
    r = run("run", p, "pat=1:3", "-o", tmp_path / "run", "--force", "--json")
    assert r.exit_code == 0, r.output
    assert [s["skipped"] for s in json.loads(r.stdout)["steps"]] == [False, False]
    assert json.loads((tmp_path / "run" / "i" / "config.json").read_text())["depth"] == 4


def test_interrupted_step_resumes_with_run_resume(tmp_path, monkeypatch):
    """Item 13: an interrupted training step asks for `ditc run --resume`, which exists and
    continues it from its saved state."""
    from dit_compress.train import trainer as T

    steps = [{"name": "ft", "command": "finetune",
              "args": {"source": "digits-dit", "data": "digits", "steps": 4, "batch_size": 4, "ema": 0.0}}]
    p = recipe(tmp_path, steps)
    real = T.Trainer._checkpoint

    def stop_at_2(self, run_, step):
        if step == 2:
            self._stop_signal = 2
        return real(self, run_, step)

    monkeypatch.setattr(T.Trainer, "_checkpoint", stop_at_2)
    r = run("run", p, "-o", tmp_path / "run")
    assert r.exit_code == 130 and "interrupted at step 2" in r.stderr, r.output
    monkeypatch.setattr(T.Trainer, "_checkpoint", real)
    r = run("run", p, "-o", tmp_path / "run")
    assert r.exit_code == 2 and "ditc run --resume" in r.stderr, r.output
    r = run("run", p, "-o", tmp_path / "run", "--resume", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "run" / "ft" / "report.json").read_text())
    assert rep["resumed_from"] == 2 and rep["steps"] == 4


@pytest.mark.parametrize("name", ["../victim", "/tmp/elsewhere", "a/b", 7])
def test_recipe_names_stay_under_runs(tmp_path, name):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": name, "steps": [{"name": "prune", **PRUNE}]}))
    refused(run("run", p), "must be a plain name")


def test_an_existing_output_this_run_did_not_make_is_never_replaced(tmp_path, monkeypatch):
    """A step's output dir that holds someone's files (no record of this run) is refused, not
    replaced; `--force` replaces it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine" / "prune").mkdir(parents=True)
    (tmp_path / "mine" / "prune" / "precious.txt").write_text("x")
    p = recipe(tmp_path, [{"name": "prune", **PRUNE}])
    refused(run("run", p, "-o", tmp_path / "mine"), "this run did not make it")
    assert (tmp_path / "mine" / "prune" / "precious.txt").read_text() == "x"
    r = run("run", p, "-o", tmp_path / "mine", "--force")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "mine" / "prune" / "precious.txt").exists()


@pytest.mark.parametrize("text,msg", [("args: &x {source: [*x]}\nname: t\nsteps: [{name: a, command: info, args: *x}]",
                                       "uses a YAML alias"),
                                      ("name: t\nsteps: " + "[" * 5000 + "]" * 5000, "nests deeper than 32 levels"),
                                      ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + "".join(
                                          f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n"
                                          for p, c in zip("abcdefgh", "bcdefghi")) + "name: t\nsteps: [*i]",
                                       "uses a YAML alias (*a, line 2)"),
                                      ("# " + "x" * (1 << 20) + "\nname: t\nsteps: []", "larger than 1024 KB"),
                                      ("name: t\nsteps: [{name: a, command: info, args: {1: 2}}]", "must be text"),
                                      ("name: t\nsteps: [1, 2]", "must be a mapping"),
                                      (b"\xff\xfe\x00garbage\x80", "cannot be read as text")])
def test_hostile_recipe_files_are_refused_in_one_line(tmp_path, text, msg):
    p = tmp_path / "r.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(run("run", p), msg)


def test_yaml_numbers_and_dates_that_are_text_stay_text_and_odd_types_are_refused_before_any_step(tmp_path):
    from dit_compress.pipeline import parse_yaml

    p = tmp_path / "r.yaml"
    p.write_text("pattern: 1:2\nwhen: 2024-01-01\nn: 12\nx: 0.5\nbig: 1e3\n")
    assert parse_yaml(p) == {"pattern": "1:2", "when": "2024-01-01", "n": 12, "x": 0.5, "big": 1000.0}
    p.write_text("name: t\nsteps:\n  - {name: a, command: info, args: {source: !!binary aGVsbG8=}}\n")
    r = run("run", p, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "is not plain text" in r.stderr and not (tmp_path / "out").exists(), r.output
