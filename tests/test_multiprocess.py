"""Across processes, as a multi-GPU run: real 2-process `accelerate launch` runs (gloo on the
CPU) of DyDiT fine-tuning with its default stage-1 loss, the learned depth search, and a stop
signal that reaches one process only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import randomize

import dit_compress as dc
from dit_compress.formats import load_model

# two CPU processes over gloo, whatever the machine has: on a one-GPU machine two processes cannot
# each find a GPU of their own
ENV = dict(os.environ, DITC_NO_PROGRESS="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dit_compress.cli"]


def digits_model(path, depth=4):
    m = dc.create("custom", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2,
                  num_classes=10, pixel=True, seed=0)
    dc.save_model(randomize(m), path)
    return path


def launch(*args, timeout=600):
    return subprocess.run([*LAUNCH, *[str(a) for a in args]], env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_dydit_finetune_with_default_options(tmp_path):
    """DyDiT's stage-1 full-model loss (on by default) used to run a second forward before the
    backward, which DDP refuses; it now shares the routed forward."""
    dc.add_dynamic_width(str(digits_model(tmp_path / "m")), output=tmp_path / "dyn", target_flops=0.5)
    p = launch("finetune", tmp_path / "dyn", "--data", "digits", "--steps", "4", "--batch-size", "4", "-o", tmp_path / "o",
               "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout)  # one report: only the main process prints
    assert rep["processes"] == 2 and rep["dynamic"]["full_loss"] == 1.0
    assert "full_loss" in json.loads((tmp_path / "o" / "report.json").read_text())["history"][-1]
    assert load_model(str(tmp_path / "o")).config.width.target_flops == 0.5
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dyn", "m", "o"]


@pytest.mark.slow
def test_two_process_learned_depth_search_decides_once_and_writes_once(tmp_path):
    """Every process searches with synchronised logits and must reach the same mask (checked
    across ranks: a disagreement would stop the run); only the main process writes and prints."""
    src = digits_model(tmp_path / "m")
    p = launch("prune-depth", src, "--pattern", "1:2", "--data", "digits", "--steps", "6", "--batch-size", "4",
               "--calib-samples", "8", "--no-measure-cost", "-o", tmp_path / "p", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"kept_layers"') == 1
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["method"] == "learned" and len(rep["kept_layers"]) == 2
    assert load_model(str(tmp_path / "p")).config.kept_layers == rep["kept_layers"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m", "p"]


@pytest.mark.slow
def test_a_stop_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 only: both processes stop at the same step (the flag is agreed
    each step), the state is saved once, and a 2-process --resume finishes the run."""
    import psutil

    src = digits_model(tmp_path / "m", depth=2)
    args = ["finetune", src, "--data", "digits", "--batch-size", "2", "--ema", "0", "-o", tmp_path / "o"]
    proc = subprocess.Popen([*LAUNCH, *[str(a) for a in args], "--steps", "100000"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = tmp_path / ".o.ditc-work"
    try:
        deadline = time.time() + 300
        rank1 = None
        while time.time() < deadline and rank1 is None:
            time.sleep(0.5)
            for c in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "dit_compress.cli" in " ".join(c.cmdline()) and c.environ().get("RANK") == "1":
                        rank1 = c
                except psutil.Error:
                    continue
        assert rank1 is not None, "rank 1 never started"
        while time.time() < deadline and not work.exists():
            time.sleep(0.2)
        time.sleep(3)  # some steps in
        rank1.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    state = json.loads((work / "train_state" / "state.json").read_text())
    stopped = state["step"]
    assert stopped > 0 and err.count("interrupted at step") == 2, err[-2000:]
    assert f"interrupted at step {stopped};" in err and not (tmp_path / "o").exists()
    p = launch(*args, "--steps", stopped + 2, "--resume", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout)
    assert rep["resumed_from"] == stopped and rep["processes"] == 2 and not work.exists()
    assert torch.isfinite(torch.tensor(rep["final_loss"]))
