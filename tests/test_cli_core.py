"""ditc info / convert / create through the CLI: published FLOPs, exit codes, atomic outputs."""

import json
import os

import pytest
import torch
from helpers import tiny_model
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.formats import load_model, save_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("arch,gflops,shown", [("DiT-S/2", 6.06, "6.06"), ("DiT-B/2", 23.01, "23.0"),
                                               ("DiT-L/2", 80.71, "80.7"), ("DiT-XL/2", 118.64, "118.6")])
def test_info_prints_published_flops(arch, gflops, shown):
    r = run("info", "--arch", arch, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert abs(d["gflops"] - gflops) < 0.03
    r = run("info", "--arch", arch)
    assert f"│ {shown} " in r.stdout


def test_info_on_checkpoint_json(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    d = json.loads(run("info", tmp_path / "m", "--json").stdout)
    assert d["depth"] == 4 and d["params"] == tiny_model().num_params()


def test_convert_all_layouts_and_back(tmp_path):
    m = tiny_model(seed=3)
    save_model(m, tmp_path / "src")
    assert run("convert", tmp_path / "src", "--to", "diffusers", "-o", tmp_path / "d").exit_code == 0
    assert run("convert", tmp_path / "d", "--to", "original", "-o", tmp_path / "o.pt").exit_code == 0
    r = run("convert", tmp_path / "o.pt", "--to", "ditc", "--num-heads", "2", "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    a, b = m.state_dict(), load_model(tmp_path / "back").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_refused_without_force(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = run("convert", tmp_path / "m", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run("convert", tmp_path / "m", "-o", tmp_path / "out", "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = run("convert", tmp_path / "m", "-o", ro / "x")
    assert r.exit_code == 1 and "not writable" in r.stderr


def test_unwritable_output_path_is_a_file(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    (tmp_path / "file").write_text("x")
    r = run("convert", tmp_path / "m", "-o", tmp_path / "file" / "sub")
    assert r.exit_code != 0
    assert "Traceback" not in r.output


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    save_model(tiny_model(), tmp_path / "m")
    import dit_compress.formats.ditc as ditc

    def boom(*a, **k):
        raise ditc.FormatError("disk full (simulated)")

    monkeypatch.setattr(ditc, "write_weights", boom)
    r = run("convert", tmp_path / "m", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "disk full" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_bad_inputs_exit_codes(tmp_path):
    r = run("info", "DiT-XXL")
    assert r.exit_code == 2 and "unknown model" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    r = run("info", tmp_path / "bad.safetensors")
    assert r.exit_code == 1 and "corrupt" in r.stderr
    r = run("convert", tmp_path / "bad.safetensors", "--to", "onnx", "-o", tmp_path / "x")
    assert r.exit_code != 0
    save_model(tiny_model(), tmp_path / "m")
    r = run("convert", tmp_path / "m", "--to", "original", "-o", tmp_path / "x.bin.dir")
    assert r.exit_code == 2 and ".pt" in r.stderr


def test_create_custom(tmp_path):
    r = run("create", "custom", "--input-size", "8", "--patch-size", "1", "--in-channels", "1", "--hidden-size", "32",
            "--depth", "2", "--num-heads", "2", "--num-classes", "10", "--pixel", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    m = load_model(tmp_path / "c")
    assert m.config.latent_scale is None and m.config.lineage[0]["op"] == "create"
    r = run("create", "DiT-Q/2", "-o", tmp_path / "q")
    assert r.exit_code == 2 and "unknown architecture" in r.stderr


def test_library_parameter_names_become_flags_on_the_command_line(tmp_path):
    import dit_compress as dc
    from dit_compress.errors import UsageError

    with pytest.raises(UsageError, match="`method` oracle needs `keep`"):  # Python users: the keywords
        dc.prune_depth("digits-dit", output=tmp_path / "o", method="oracle")
    r = run("prune-depth", "digits-dit", "--method", "oracle", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "--method oracle needs --keep i,j,k" in r.stderr and "`" not in r.stderr
    # a parameter whose flag is spelled differently keeps the command's spelling
    from dit_compress.cli import as_flags, flag_names, prune_depth_cmd

    assert as_flags("`num_candidates` must be > 0", flag_names(prune_depth_cmd.__wrapped__)) == "--candidates must be > 0"
    assert not (tmp_path / "o").exists()


def test_no_arguments_prints_the_help_and_parse_errors_are_one_line():
    r = run()
    assert r.exit_code == 0 and "Usage" in r.output and "prune-depth" in r.output
    r = run("finetune", "digits-dit", "--steps", "abc")
    assert r.exit_code == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    r = run("info")
    assert r.exit_code == 2 and "Missing argument" in r.stderr and r.stderr.count("\n") == 1
