"""Re-key the evals shipped in dit_compress/assets/evals after a change of what identifies an
eval's inputs (the model's identity, the caption shards' identity), and seal them.

Nothing is sampled: each entry's eval is called again with the settings its report records,
up to the point where the cache key is known (the cache lookup is intercepted there); the entry
moves to that key, its report's producer takes the new identities, and the seal of its files'
digests is written last. Run from the repository root: python benchmarks/rekey_shipped_evals.py
"""

import json
import shutil
import tempfile
from pathlib import Path

import dit_compress as dc
from dit_compress.assets import EVALS_DIR
from dit_compress.evaluate import fidelity
from dit_compress.hashing import SEAL, seal


class Found(Exception):
    pass


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ditc-rekey-"))
    caps = tmp / "caps"  # the held-out captions, as the README of the evals says they were made
    dc.prepare_data("digits:test", text_encoder="digits-pixart", max_length=16, output=str(caps))
    seen = {}
    real_from_cache = fidelity._from_cache

    def capture(key):
        seen["key"] = key
        raise Found

    fidelity._from_cache = capture
    try:
        for entry in sorted(p for p in EVALS_DIR.iterdir() if p.is_dir()):
            rep = json.loads((entry / "report.json").read_text())
            t2i = rep.get("prompts") is not None
            kw = dict(output=str(tmp / f"out-{entry.name}"), num_samples=rep["num_samples"], sampler=rep["sampler"],
                      steps=rep["steps"], timestep_spacing=rep["timestep_spacing"], cfg_scale=rep["cfg_scale"],
                      seed=rep["seed"])
            if t2i:
                kw["prompts"] = str(caps)
                kw["loss_data"] = str(caps) if "heldout_loss" in rep["metrics"] else "none"
            try:
                dc.evaluate_model(rep["source"], **kw)
            except Found:
                pass
            key = seen.pop("key")
            model = dc.load_model(rep["source"])
            rep["producer"]["model"] = fidelity.fingerprint(model)
            if t2i:
                rep["producer"]["prompts"]["data"] = fidelity.data_identity(str(caps))
            (entry / "report.json").write_text(json.dumps(rep, indent=2))
            (entry / SEAL).unlink(missing_ok=True)
            seal(entry, fidelity.CACHED, key=key)
            if key != entry.name:
                entry.rename(EVALS_DIR / key)
            print(f"{entry.name} -> {key} ({rep['source']}, seed {rep['seed']})")
    finally:
        fidelity._from_cache = real_from_cache
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
