"""The file boundary: checkpoints, configs and data shards that a careless tool or an
attacker wrote are refused in one line, before anything is allocated from what they say."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from helpers import tiny_model
from safetensors import safe_open
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file
from typer.testing import CliRunner

from dit_compress.cli import app
from dit_compress.errors import FormatError
from dit_compress.formats import load_model, save_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(r, code=1, text=None):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    if text is not None:
        assert text in r.stderr, r.stderr


def tamper(path, **changes):
    """Rewrite a ditc checkpoint with config fields changed in both its metadata and config.json."""
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    cfg = json.loads(meta["ditc_config"])
    cfg.update(changes)
    meta["ditc_config"] = json.dumps(cfg)
    save_file(tensors, str(f), metadata=meta)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,text", [
    ({"kept_layers": [0, 1, 2, 9]}, "kept_layers"),
    ({"kept_layers": [-1, 0, 1, 2]}, "kept_layers"),
    ({"kept_layers": "0,1,2,3"}, "kept_layers"),
    ({"kept_layers": [0, 0, 1, 2]}, "kept_layers"),
    ({"learn_sigma": "no"}, "learn_sigma must be true or false"),
    ({"hidden_size": "32"}, "hidden_size must be an integer"),
    ({"hidden_size": None}, "hidden_size must be an integer"),
    ({"hidden_size": 32.0}, "hidden_size must be an integer"),
    ({"patch_size": 0}, "patch_size must be at least 1"),
    ({"mlp_ratio": -4.0}, "mlp_ratio must be in (0, 64]"),
    ({"num_heads": True}, "num_heads must be an integer"),
    ({"width": {"target_flops": 0.5, "bogus": 1}}, "unknown field"),
])
def test_tampered_config_is_refused(tmp_path, changes, text):
    """Items 6 and 10 (config fields): a config of the wrong type or out of range is a
    FormatError naming the field, never accepted and passed on, never a traceback."""
    save_model(tiny_model(), tmp_path / "m")
    tamper(tmp_path / "m", **changes)
    with pytest.raises(FormatError, match="config"):
        load_model(str(tmp_path / "m"))
    one_line(run("info", tmp_path / "m"), text=text)


def test_config_json_disagreeing_with_the_metadata_is_refused(tmp_path):
    """Item 6: the safetensors metadata is what is read; a config.json that says otherwise is
    refused, naming the field, instead of being silently ignored."""
    save_model(tiny_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_classes"] = 99
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    one_line(run("info", tmp_path / "m"), text="disagrees with the config in model.safetensors's metadata on 'num_classes'")
    # the lone file is self-describing and still loads
    assert load_model(str(tmp_path / "m" / "model.safetensors")).config.num_classes == 10


def test_huge_sizes_are_refused_before_anything_is_allocated(tmp_path):
    """Item 9: a small file whose config claims a 20000-px input, and a sparse 40 GB
    safetensors file, are refused by what they declare, before any table or tensor exists."""
    save_model(tiny_model(), tmp_path / "m")
    tamper(tmp_path / "m", input_size=20000)
    one_line(run("info", tmp_path / "m"), text="tokens, more than")
    # a header declaring a 40 GB tensor, the file sparse: refused from the header alone
    save_model(tiny_model(), tmp_path / "big")
    f = tmp_path / "big" / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    n = 10 * 2**30  # float32 elements: 40 GiB
    header = json.dumps({"__metadata__": meta, "x_embedder.proj.weight": {"dtype": "F32", "shape": [n],
                                                                         "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + 4 * n)
    one_line(run("info", tmp_path / "big"), text="x_embedder.proj.weight")


def _shard(path, latents, labels):
    path.mkdir(exist_ok=True)
    save_np({"latents": latents, "labels": labels}, str(path / "shard-00000.safetensors"))


@pytest.mark.parametrize("latents,labels,text", [
    (np.zeros((8, 1, 8, 8), np.float32), np.zeros(3, np.int64), "holds 8 latents but 3 labels"),
    (np.zeros((3, 1, 8, 8), np.float32), np.array([0.0, 1.7, 2.2]), "labels must be a 1-D array of integer classes"),
    (np.zeros((3, 1, 8, 8), np.float32), np.zeros((3, 2), np.int64), "labels must be a 1-D array"),
    (np.zeros((3, 8, 8), np.float32), np.zeros(3, np.int64), "latents must be float"),
])
def test_bad_shards_are_refused(tmp_path, latents, labels, text):
    """Items 7 and 10 (shards): counts that disagree, float or 2-D labels, latents of the
    wrong rank: one line, nothing trained on a silent subset, nothing written."""
    save_model(tiny_model(in_channels=1, latent_scale=None), tmp_path / "m")
    _shard(tmp_path / "d", latents, labels)
    one_line(run("finetune", tmp_path / "m", "--data", tmp_path / "d", "--steps", "1", "-o", tmp_path / "o"), text=text)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.ditc-work").exists()


def test_shards_of_mixed_shapes_are_refused(tmp_path):
    save_model(tiny_model(in_channels=1, latent_scale=None), tmp_path / "m")
    (tmp_path / "d").mkdir()
    save_np({"latents": np.zeros((2, 1, 8, 8), np.float32), "labels": np.zeros(2, np.int64)},
            str(tmp_path / "d" / "shard-00000.safetensors"))
    save_np({"latents": np.zeros((2, 1, 4, 4), np.float32), "labels": np.zeros(2, np.int64)},
            str(tmp_path / "d" / "shard-00001.safetensors"))
    one_line(run("finetune", tmp_path / "m", "--data", tmp_path / "d", "--steps", "1", "-o", tmp_path / "o"),
             text="every shard must have one shape")
