"""The output boundary: nothing an output path can say loses data or leaves a partial
output behind (the one output writer in dit_compress/outputs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import tiny_model
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.formats import save_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def one_line_refusal(r, code=2, text=None):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    if text is not None:
        assert text in r.stderr, r.stderr


@pytest.fixture()
def model_dir(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("out", ["", ".", "./", ".."])
def test_empty_or_dot_output_never_touches_the_current_directory(tmp_path, model_dir, monkeypatch, out):
    """Item 1: `-o "$OUT"` with OUT unset, or `-o .`, used to delete the current directory."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep").write_text("mine")
    monkeypatch.chdir(work / "sub" if out == ".." else work)
    before = listing(tmp_path)
    r = run("convert", model_dir, "-o", out, "--force")
    one_line_refusal(r)
    assert listing(tmp_path) == before and (work / "keep").read_text() == "mine"


def test_output_holding_the_current_directory_home_or_the_source(tmp_path, model_dir, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    one_line_refusal(run("convert", model_dir, "-o", tmp_path / "a", "--force"), text="current directory")
    one_line_refusal(run("convert", model_dir, "-o", os.path.expanduser("~"), "--force"), text="home directory")
    # the source itself, or a directory holding it (eval m/ -o m/, convert m/ -o parent/)
    monkeypatch.chdir("/")
    one_line_refusal(run("convert", model_dir, "-o", model_dir, "--force"), text="is the source")
    one_line_refusal(run("eval", model_dir, "-o", model_dir, "-n", "4"), text="is the source")
    one_line_refusal(run("prune-depth", model_dir, "-o", tmp_path, "--force", "--method", "uniform", "--pattern", "1:2"),
                     text="is the source")
    assert (model_dir / "model.safetensors").exists()


def test_eval_refuses_an_existing_output_without_force(tmp_path, model_dir):
    """Item 3: eval into a directory with files (or an earlier eval's report) needs --force."""
    out = tmp_path / "e"
    out.mkdir()
    (out / "report.json").write_text('{"mine": 1}')
    one_line_refusal(run("eval", model_dir, "-o", out, "-n", "4", "--steps", "2"), text="already exists")
    assert (out / "report.json").read_text() == '{"mine": 1}'
    assert not any(p.name.startswith(".e.") for p in tmp_path.iterdir())


def test_second_writer_of_the_same_output_fails_at_start(tmp_path, model_dir):
    """Item 4: a second process writing an output another process holds fails at once."""
    out = tmp_path / "shared"
    holder = textwrap.dedent(f"""
        import sys, time
        from dit_compress.outputs import claim_output
        with claim_output({str(out)!r}, False):
            print("held", flush=True)
            time.sleep(30)
    """)
    p = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        r = run("convert", model_dir, "-o", out)
        one_line_refusal(r, text="being written by another ditc process")
        assert not out.exists()
    finally:
        p.kill()
        p.wait()
    assert run("convert", model_dir, "-o", out).exit_code == 0  # the lock went with its process


def test_symlinks_dangling_links_files_in_the_way_and_unwritable_places(tmp_path, model_dir):
    """Item 10 (output paths): one line each, never a traceback."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    one_line_refusal(run("convert", model_dir, "-o", tmp_path / "link", "--force"), text="symbolic link")
    assert (tmp_path / "real").is_dir() and (tmp_path / "link").is_symlink()
    # through a linked parent: the parent is resolved and the output lands in the real directory
    assert run("convert", model_dir, "-o", tmp_path / "link" / "x").exit_code == 0
    assert (tmp_path / "real" / "x" / "model.safetensors").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    one_line_refusal(run("convert", model_dir, "-o", tmp_path / "dangling"), text="symbolic link")
    one_line_refusal(run("convert", model_dir, "-o", tmp_path / "dangling" / "x"))
    (tmp_path / "file").write_text("x")
    one_line_refusal(run("convert", model_dir, "-o", tmp_path / "file" / "x"), text="is a file")
    r = run("convert", model_dir, "-o", "/proc/ditc-out")
    assert r.exit_code != 0 and "Traceback" not in r.output and r.stderr.count("\n") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failures_leave_nothing_behind(tmp_path, model_dir, monkeypatch):
    """Item 11: no `.*.tmp`, no empty eval/prepare-data dirs, no work dirs after a refusal or a
    failure; a replaced output survives a failed replacement whole."""
    import dit_compress.formats.ditc as ditc

    before = listing(tmp_path)
    for args in (["eval", model_dir, "-o", tmp_path / "e", "-n", "0"],
                 ["eval", model_dir, "-o", tmp_path / "e", "-n", "4", "--metrics", "bogus"],
                 ["prepare-data", tmp_path / "missing", "-o", tmp_path / "lat"],
                 ["prepare-data", model_dir / "model.safetensors", "-o", tmp_path / "lat"],
                 ["finetune", model_dir, "--data", "digits", "--steps", "0", "-o", tmp_path / "ft"]):
        r = run(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)
        assert listing(tmp_path) == before, args
    # a write that fails half-way: the existing output is kept whole, no temporary left
    assert run("convert", model_dir, "-o", tmp_path / "out").exit_code == 0
    good = (tmp_path / "out" / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ditc, "save_file", broken)
    r = run("convert", model_dir, "-o", tmp_path / "out", "--force")
    assert r.exit_code != 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_an_output_finished_by_another_writer_before_the_lock_is_not_replaced(tmp_path, monkeypatch):
    """The existence check runs again under the lock: a writer that held the lock and finished
    between our first check and our lock keeps its output."""
    import fcntl

    from dit_compress import outputs
    from dit_compress.errors import UsageError

    out = tmp_path / "o"
    real = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not out.exists():  # the other writer finishes just before we lock
            out.mkdir()
            (out / "a").write_text("A")
        return real(fd, op)

    monkeypatch.setattr(outputs.fcntl, "flock", flock)
    with pytest.raises(UsageError, match="already exists"):
        with outputs.atomic_dir(out) as tmp:
            (tmp / "a").write_text("B")
    assert (out / "a").read_text() == "A"


def test_an_output_that_appears_while_the_command_runs_is_not_replaced(tmp_path):
    from dit_compress import outputs
    from dit_compress.errors import UsageError

    out = tmp_path / "o"
    with pytest.raises(UsageError, match="appeared while this command ran"):
        with outputs.atomic_file(out) as tmp:
            tmp.write_text("ours")
            out.write_text("theirs")  # another program, not ditc, wrote it meanwhile
    assert out.read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["o"]


def test_processes_other_than_the_main_one_write_nothing(tmp_path, monkeypatch):
    from dit_compress import outputs

    monkeypatch.setenv("RANK", "1")
    with outputs.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("rank 1")
    with outputs.atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("rank 1")
    assert list(tmp_path.iterdir()) == []


def test_a_path_object_source_and_an_embedded_model_by_name_are_protected(tmp_path, monkeypatch):
    from pathlib import Path

    import dit_compress as dc
    from dit_compress.assets import EMBEDDED

    dc.convert("digits-dit", output=tmp_path / "s1")
    with pytest.raises(dc.UsageError):
        dc.convert(Path(tmp_path / "s1"), output=tmp_path / "s1", force=True, to="diffusers")
    assert (tmp_path / "s1" / "model.safetensors").exists()
    with pytest.raises(dc.UsageError):
        dc.convert("digits-dit", output=EMBEDDED["digits-dit"], force=True, to="diffusers")
    assert (EMBEDDED["digits-dit"] / "model.safetensors").exists()
