"""Files shipped inside the package: the digits testbeds (digits-dit, eps; digits-sit, velocity;
digits-pixart, text-to-image, a diffusers PixArtAlphaPipeline dir) and their feature network."""

from pathlib import Path

ASSETS = Path(__file__).parent
TESTBED_NAME = "digits-dit"
TESTBED_DIR = ASSETS / "digits-dit"
# Embedded testbeds by name: the eps DiT and its flow-matching twin (same network, SiT objective).
EMBEDDED = {TESTBED_NAME: TESTBED_DIR, "digits-sit": ASSETS / "digits-sit", "digits-pixart": ASSETS / "digits-pixart"}
FEATURES_FILE = ASSETS / "digits-features.safetensors"
# Evals computed once and shipped (the quickstart's base-model evals), by their cache key
EVALS_DIR = ASSETS / "evals"
