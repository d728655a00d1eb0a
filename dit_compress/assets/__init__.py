"""Files shipped inside the package: the digits testbeds (digits-dit, eps; digits-sit, velocity;
digits-pixart, text-to-image, a diffusers PixArtAlphaPipeline dir; digits-mar, a masked
autoregressive model) and their feature network."""

from pathlib import Path

from ..errors import UsageError

ASSETS = Path(__file__).parent
TESTBED_NAME = "digits-dit"
TESTBED_DIR = ASSETS / "digits-dit"
# Embedded testbeds by name: the eps DiT and its flow-matching twin (same network, SiT objective).
EMBEDDED = {TESTBED_NAME: TESTBED_DIR, "digits-sit": ASSETS / "digits-sit", "digits-pixart": ASSETS / "digits-pixart",
            "digits-mar": ASSETS / "digits-mar"}
FEATURES_FILE = ASSETS / "digits-features.safetensors"
# Evals computed once and shipped (the quickstart's base-model evals), by their cache key
EVALS_DIR = ASSETS / "evals"


def embedded(name, names=EMBEDDED) -> Path | None:
    """What a built-in name (``digits-dit``, ``digits-pixart``; ``names`` maps them) stands
    for, or None when ``name`` is not one (a path, or any text not a name: ``./digits-dit`` is
    the local folder). A file or folder of the same name where the command runs is refused
    rather than silently passed over."""
    if not isinstance(name, str) or name not in names:
        return None
    if Path(name).exists():
        raise UsageError(f"{name} is the name of one of ditc's built-in models and also of the local "
                         f"{'folder' if Path(name).is_dir() else 'file'} {name}: pass ./{name} for the local one")
    return names[name]
