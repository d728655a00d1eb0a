"""One identity for everything that produces a result: every byte of a model's weights, of
caption features, of the files a recipe step reads; cache entries and work shards verified
before use (damaged ones skipped, recomputed, replaced); bounded reads of what a command is
given; recipes judged whole before they run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import randomize
from typer.testing import CliRunner

import dit_compress as dc
import dit_compress.evaluate.fidelity as F
from dit_compress.assets import EVALS_DIR
from dit_compress.cli import app
from dit_compress.hashing import SEAL
from dit_compress.model.build import fingerprint

runner = CliRunner()
QUICKSTART = dict(num_samples=500, sampler="ddim", steps=10, timestep_spacing="leading", cfg_scale=2.0)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def pixel_model(path, seed):
    m = dc.create("custom", input_size=8, patch_size=1, in_channels=1, hidden_size=16, depth=2, num_heads=2,
                  num_classes=10, pixel=True, seed=seed)
    dc.save_model(randomize(m, seed), path)
    return path


def swap_two(t: torch.Tensor, j: int | None = None) -> int | None:
    """Swap value 0 of ``t`` with value ``j`` (default: the first one that differs from it), in
    place; returns ``j`` (None when all values are equal)."""
    flat = t.view(-1)
    if j is None:
        diff = (flat != flat[0]).nonzero()
        if not len(diff):
            return None
        j = int(diff[0])
    a, b = flat[0].clone(), flat[j].clone()
    flat[0], flat[j] = b, a
    return j


def test_two_swapped_weights_in_any_tensor_are_another_model():
    """The old identity (sums and 256 strided values per tensor) kept a permuted model's."""
    m = randomize(dc.load_model("digits-dit"))
    base = fingerprint(m)
    tried = 0
    with torch.no_grad():
        for name, t in m.state_dict().items():
            j = swap_two(t) if t.numel() > 1 else None
            if j is None:
                continue
            tried += 1
            assert fingerprint(m) != base, name
            swap_two(t, j)  # back
            assert fingerprint(m) == base, name
    assert tried >= 20


def interrupted_eval(monkeypatch, source, out, args) -> None:
    """``ditc eval SOURCE -o OUT ARGS`` stopped (Ctrl-C) after its first sampled batch."""
    real, calls = F.sample, []

    def stop_after_one(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(F, "sample", stop_after_one)
    assert run("eval", source, "-o", out, *args).exit_code == 130
    monkeypatch.setattr(F, "sample", real)


def key_of(source, **kw) -> str:
    """The eval cache key of ``dc.evaluate_model(source, ...)``, nothing sampled."""
    seen = {}

    class Found(Exception):
        pass

    def capture(key):
        seen["key"] = key
        raise Found

    real = F._from_cache
    F._from_cache = capture
    try:
        dc.evaluate_model(source, output="unused-output", **kw)
    except Found:
        pass
    finally:
        F._from_cache = real
    return seen["key"]


def test_a_permuted_copy_of_digits_dit_is_served_neither_its_cached_eval_nor_its_work_dir(tmp_path, monkeypatch):
    m = dc.load_model("digits-dit")
    with torch.no_grad():
        assert swap_two(m.state_dict()["blocks.3.mlp.fc1.weight"]) is not None
    dc.save_model(m, tmp_path / "m_perm")
    shipped = key_of("digits-dit", seed=0, **QUICKSTART)
    assert (EVALS_DIR / shipped).is_dir()
    assert key_of(str(tmp_path / "m_perm"), seed=0, **QUICKSTART) != shipped
    # an interrupted eval of digits-dit is not resumed with the permuted copy
    args = ["-n", 20, "--shard-size", 10, "--batch-size", 10, "--steps", 2, "--metrics", "fid", "--no-cache", "--json"]
    interrupted_eval(monkeypatch, "digits-dit", tmp_path / "w3", args)
    r = run("eval", tmp_path / "m_perm", "-o", tmp_path / "w3", *args)
    assert r.exit_code == 2 and "unfinished eval made with other settings (model:" in r.stderr, r.output


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    out = tmp_path_factory.mktemp("ids") / "caps"
    dc.prepare_data("digits:test", output=out, text_encoder="digits-pixart", max_length=16)
    return out


def test_two_caption_rows_swapped_are_another_input_and_not_served(caps, tmp_path):
    """The old identity (a few rounded statistics of the features) kept a set with caption rows
    swapped between samples of different digits, and the shipped eval was served for it."""
    import shutil

    from safetensors.numpy import load_file, save_file

    kw = dict(seed=1, prompts=str(caps), **{**QUICKSTART, "cfg_scale": 3.0})
    assert (EVALS_DIR / key_of("digits-pixart", **kw)).is_dir()
    swapped = tmp_path / "swapped"
    shutil.copytree(caps, swapped)
    shard = swapped / "shard-00000.safetensors"
    arrays = load_file(str(shard))
    labels = arrays["labels"]
    i, j = 0, int(np.nonzero(labels != labels[0])[0][0])  # two samples of different digits
    emb = arrays["caption_emb"]
    emb[[i, j]] = emb[[j, i]]
    save_file(arrays, str(shard))
    assert F.data_identity(str(swapped)) != F.data_identity(str(caps))
    assert not (EVALS_DIR / key_of("digits-pixart", **{**kw, "prompts": str(swapped)})).exists()


def tiny_recipe(tmp_path, source) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(f"name: ids\nsteps:\n  - {{name: conv, command: convert, args: {{source: '{source}', to: ditc}}}}\n")
    return str(p)


def test_a_recipe_step_reruns_when_its_source_changed_at_the_same_path(tmp_path):
    src = pixel_model(tmp_path / "src", 0)
    r = run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    r = run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run")
    assert r.exit_code == 0 and "finished earlier, skipped" in r.output
    import shutil

    shutil.rmtree(src)
    pixel_model(src, 1)  # another model at the same path (same sizes)
    r = run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run")
    assert r.exit_code == 2 and "finished earlier with other options or inputs" in r.output, r.output
    r = run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run", "--force")
    assert r.exit_code == 0 and "skipped" not in r.output
    assert fingerprint(dc.load_model(str(tmp_path / "run" / "conv"))) == fingerprint(dc.load_model(str(src)))


def test_a_rerun_keeps_each_skipped_steps_seconds(tmp_path):
    src = pixel_model(tmp_path / "src", 0)
    assert run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run").exit_code == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"][0]
    assert run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run").exit_code == 0
    again = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"][0]
    assert again["skipped"] and again["seconds"] == first["seconds"] and first["seconds"] > 0
    assert "None" not in (tmp_path / "run" / "summary.md").read_text()


def test_a_recipe_is_judged_whole_before_its_first_step(tmp_path):
    r = run("run", "quickstart", "prune_steps=3", "distill_steps=3", "samples=-5", "-o", tmp_path / "q")
    assert r.exit_code == 2 and "step 'eval-base" in r.stderr and "num-samples must be at least 1" in r.stderr, r.output
    assert not (tmp_path / "q").exists()


def test_a_run_refused_by_the_lock_writes_nothing(tmp_path):
    src = pixel_model(tmp_path / "src", 0)
    assert run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run").exit_code == 0
    resolved = (tmp_path / "run" / "recipe.resolved.yaml").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dit_compress.outputs import exclusive\n"
                               f"with exclusive({str(tmp_path / 'run')!r}, 'run directory'):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = tmp_path / "other.yaml"
        other.write_text("name: ids\nsteps:\n  - {name: conv, command: convert, args: {source: digits-dit, to: ditc}}\n")
        r = run("run", other, "-o", tmp_path / "run", "--force")
        assert r.exit_code == 2 and "in use by another ditc process" in r.stderr, r.output
        assert (tmp_path / "run" / "recipe.resolved.yaml").read_bytes() == resolved
    finally:
        holder.kill()


# ---------------------------------------------------------------------------- damaged cache entries
EVAL_ARGS = ["-n", 20, "--shard-size", 10, "--batch-size", 10, "--steps", 2, "--metrics", "fid", "--json"]


def damage(entry, how):
    if how == "report []":
        (entry / "report.json").write_text("[]")
    elif how == "report null":
        (entry / "report.json").write_text("null")
    elif how == "report {}":
        (entry / "report.json").write_text("{}")
    elif how == "edited metrics":
        rep = json.loads((entry / "report.json").read_text())
        rep["metrics"]["frechet_inception_distance"] = 1.0
        (entry / "report.json").write_text(json.dumps(rep))
    elif how == "truncated samples":
        data = (entry / "samples.npz").read_bytes()
        (entry / "samples.npz").write_bytes(data[: len(data) // 2])
    elif how == "missing grid":
        (entry / "samples.png").unlink()
    elif how == "no seal":
        (entry / SEAL).unlink()


@pytest.mark.parametrize("how", ["report []", "report null", "report {}", "edited metrics", "truncated samples",
                                 "missing grid", "no seal"])
def test_a_damaged_cache_entry_is_skipped_recomputed_and_replaced(tmp_path, monkeypatch, how):
    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path / "cache"))
    src = pixel_model(tmp_path / "m", 0)
    r = run("eval", src, "-o", tmp_path / "e1", *EVAL_ARGS)
    assert r.exit_code == 0, r.output
    good = json.loads(r.stdout)
    entries = list((tmp_path / "cache" / "evals").iterdir())
    assert len(entries) == 1 and (entries[0] / SEAL).exists()
    entry = entries[0]
    damage(entry, how)
    r = run("eval", src, "-o", tmp_path / "e2", *EVAL_ARGS)
    assert r.exit_code == 0, r.output
    assert f"eval cache entry {entry} skipped" in r.stderr and "Traceback" not in r.output
    rep = json.loads(r.stdout)
    assert "cached" not in rep and rep["shards_written_now"] == 2
    assert rep["metrics"] == good["metrics"]  # the same inputs computed again: the same result
    assert F.entry_problem(entry)[0] is None  # replaced by the sound result
    r = run("eval", src, "-o", tmp_path / "e3", *EVAL_ARGS)
    assert r.exit_code == 0 and "cached" in json.loads(r.stdout) and "skipped" not in r.stderr
    assert json.loads(r.stdout)["metrics"] == good["metrics"]


@pytest.mark.parametrize("how", ["truncated", "ten where twenty belong", "ten with a matching record", "no record"])
def test_a_damaged_work_shard_is_sampled_again(tmp_path, monkeypatch, how):
    src = pixel_model(tmp_path / "m", 0)
    args = ["-n", 40, "--shard-size", 20, "--batch-size", 20, "--steps", 2, "--metrics", "fid", "--no-cache", "--json"]
    interrupted_eval(monkeypatch, src, tmp_path / "e", args)
    from dit_compress.outputs import work_dir_for

    sdir = work_dir_for(tmp_path / "e") / "samples"
    shard, record = sdir / "shard-00000.npz", sdir / "shard-00000.sha256"
    assert shard.exists() and record.exists()
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        with np.load(shard) as d:
            np.savez(shard, images=d["images"][:10], labels=d["labels"][:10])
        if how == "ten with a matching record":
            record.write_text(json.dumps({"sha256": F.file_digest(shard), "images": 10}))
        if how == "no record":
            record.unlink()
    r = run("eval", src, "-o", tmp_path / "e", *args)
    assert r.exit_code == 0, r.output
    assert f"work shard {shard}" in r.stderr and "sampled again" in r.stderr
    rep = json.loads(r.stdout)
    assert rep["shards_written_now"] == 2 and np.load(tmp_path / "e" / "samples.npz")["arr_0"].shape[0] == 40


# ---------------------------------------------------------------------------- bounded reads, one-liners
def test_prompts_from_dev_zero_are_one_line_within_five_seconds(tmp_path):
    t0 = time.time()
    r = run("eval", "digits-pixart", "--prompts", "/dev/zero", "-n", 10, "-o", tmp_path / "e")
    assert r.exit_code == 2 and "larger than 16 MB" in r.stderr and r.stderr.count("\n") == 1
    assert time.time() - t0 < 5


def test_a_text_file_named_npz_as_reference_is_one_line(tmp_path):
    ref = tmp_path / "ref.npz"
    ref.write_text("not an archive")
    r = run("eval", pixel_model(tmp_path / "m", 0), "-o", tmp_path / "e", "--ref", ref, *EVAL_ARGS)
    assert r.exit_code == 1 and "is not a readable .npz archive" in r.stderr and "Traceback" not in r.output


def test_prompts_for_a_class_conditional_model_say_so(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a zero\n")
    r = run("eval", pixel_model(tmp_path / "m", 0), "--prompts", p, "-o", tmp_path / "e", *EVAL_ARGS)
    assert r.exit_code == 2 and "text-to-image" in r.stderr and "text-encoder" not in r.stderr, r.stderr


def test_an_unreadable_work_record_is_named_as_such(tmp_path, monkeypatch):
    src = pixel_model(tmp_path / "m", 0)
    from dit_compress.outputs import PRODUCER, work_dir_for

    work = work_dir_for(tmp_path / "e")
    work.mkdir(parents=True)
    (work / PRODUCER).write_text("{not json")
    r = run("eval", src, "-o", tmp_path / "e", *EVAL_ARGS)
    assert r.exit_code == 2 and f"its record of what made it, {PRODUCER}, cannot be read" in r.stderr, r.stderr
    assert "None then" not in r.stderr


def test_prompts_of_unknown_words_only_are_noted(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("zzqx wvvk\na zero\n")
    r = run("eval", "digits-pixart", "--prompts", p, "-n", 2, "--steps", 2, "--metrics", "fid", "--no-cache",
            "-o", tmp_path / "e", "--json")
    assert r.exit_code == 0, r.output
    assert "1 prompt(s) hold only words the tokenizer does not know" in json.loads(r.stdout)["warning"]


# ---------------------------------------------------------------------------- a hostile user's second round
def test_prompts_through_a_pipe_are_identified_by_the_texts_read(tmp_path, monkeypatch):
    """Two evals whose prompts come through pipes (the same kind of path, nothing to hash): the
    second is not served the first's result."""
    import os
    import threading

    from dit_compress.assets import embedded

    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path / "cache"))
    pipe_dir = embedded("digits-pixart")
    reports = []
    for i, text in enumerate(("a seven\n", "the digit zero\n")):
        fifo = tmp_path / f"p{i}"
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda f=fifo, t=text: f.write_text(t))
        writer.start()
        r = run("eval", "digits-pixart", "--prompts", fifo, "--text-encoder", pipe_dir, "-n", 4, "--steps", 2,
                "--metrics", "fid", "--shard-size", 4, "--batch-size", 4, "-o", tmp_path / f"e{i}", "--json")
        writer.join(5)
        assert r.exit_code == 0, r.output
        reports.append(json.loads(r.stdout))
    assert "cached" not in reports[1]
    assert reports[0]["producer"]["prompts"]["data"] != reports[1]["producer"]["prompts"]["data"]


def test_an_input_replaced_while_its_step_runs_is_not_recorded_as_finished(tmp_path, monkeypatch):
    import shutil

    import dit_compress.pipeline as P

    src = pixel_model(tmp_path / "src", 0)
    real = P.run_step

    def swap_then_run(step, kwargs):
        shutil.rmtree(src)
        pixel_model(src, 1)  # another model lands at the path while the step runs
        return real(step, kwargs)

    monkeypatch.setattr(P, "run_step", swap_then_run)
    r = run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run")
    assert r.exit_code == 1 and "changed while it ran" in r.stderr, r.output
    assert not (tmp_path / "run" / ".ditc-steps" / "conv.json").exists()


@pytest.mark.parametrize("what", ["device", "fifo"])
def test_a_cache_entry_file_that_is_a_device_or_a_pipe_is_skipped_not_read(tmp_path, monkeypatch, what):
    import os

    monkeypatch.setenv("DITC_CACHE_DIR", str(tmp_path / "cache"))
    src = pixel_model(tmp_path / "m", 0)
    assert run("eval", src, "-o", tmp_path / "e1", *EVAL_ARGS).exit_code == 0
    entry = next((tmp_path / "cache" / "evals").iterdir())
    (entry / "samples.npz").unlink()
    if what == "device":
        os.symlink("/dev/zero", entry / "samples.npz")
    else:
        os.mkfifo(entry / "samples.npz")
    t0 = time.time()
    r = run("eval", src, "-o", tmp_path / "e2", *EVAL_ARGS)
    assert r.exit_code == 0 and "skipped" in r.stderr and time.time() - t0 < 60, r.output


def test_a_work_shard_record_that_is_a_folder_is_resampled(tmp_path, monkeypatch):
    src = pixel_model(tmp_path / "m", 0)
    args = ["-n", 40, "--shard-size", 20, "--batch-size", 20, "--steps", 2, "--metrics", "fid", "--no-cache", "--json"]
    interrupted_eval(monkeypatch, src, tmp_path / "e", args)
    from dit_compress.outputs import work_dir_for

    sdir = work_dir_for(tmp_path / "e") / "samples"
    (sdir / "shard-00000.sha256").unlink()
    (sdir / "shard-00000.sha256").mkdir()
    (sdir / "shard-00000" / "000000.png").write_bytes(b"garbage")
    r = run("eval", src, "-o", tmp_path / "e", *args)
    assert r.exit_code == 0 and "sampled again" in r.stderr, r.output
    from PIL import Image

    assert Image.open(tmp_path / "e" / "samples" / "shard-00000" / "000000.png").size == (8, 8)


def test_a_run_dir_through_a_link_takes_the_same_lock(tmp_path):
    import os

    from dit_compress.outputs import exclusive

    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "run", tmp_path / "link")
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom dit_compress.outputs import exclusive\n"
                               f"with exclusive({str(tmp_path / 'run')!r}, 'run directory'):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(dc.UsageError, match="in use"):
            with exclusive(tmp_path / "link", "run directory"):
                pass
    finally:
        holder.kill()


def test_recorded_seconds_that_are_not_a_duration_are_not_reported(tmp_path):
    src = pixel_model(tmp_path / "src", 0)
    assert run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run").exit_code == 0
    rec = tmp_path / "run" / ".ditc-steps" / "conv.json"
    for bad in ('"abc"', "-5", '{"a": 1}', "NaN"):
        rec.write_text(rec.read_text().rsplit('"seconds"', 1)[0] + f'"seconds": {bad}}}')
        assert run("run", tiny_recipe(tmp_path, src), "-o", tmp_path / "run").exit_code == 0
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"][0]["seconds"] is None


def test_a_grid_with_a_very_long_prompt_is_drawn(tmp_path):
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    F.sample_grid_png(tmp_path / "g.png", imgs, np.array([0, 1]), 2, row_labels=["seven " * 200000, "zero"])
    assert (tmp_path / "g.png").exists()


def test_bench_token_capacity_leaves_the_dense_baseline_alone():
    r = run("bench", "--shape", "DiT-S/2", "--variants", "tokens0.5", "--batch-sizes", 1, "--repeats", 1, "--warmup", 0,
            "--token-capacity", 0.25, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert rows[1]["flops_ratio"] > 1.3  # the routed model ran at its capacity, the baseline with none to cap
