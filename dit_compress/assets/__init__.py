"""Files shipped inside the package: the digits testbed DiT and its feature network."""

from pathlib import Path

from ..config import DiTConfig

ASSETS = Path(__file__).parent
TESTBED_NAME = "digits-dit"
TESTBED_DIR = ASSETS / "digits-dit"
# Embedded testbeds by name: the eps DiT and its flow-matching twin (same network, SiT objective).
EMBEDDED = {TESTBED_NAME: TESTBED_DIR, "digits-sit": ASSETS / "digits-sit"}
FEATURES_FILE = ASSETS / "digits-features.safetensors"


def testbed_config():
    """The embedded model: class-conditional pixel-space DiT on 8x8 digits, 64 tokens."""

    return DiTConfig(
        input_size=8, patch_size=1, in_channels=1, hidden_size=128, depth=12, num_heads=4,
        num_classes=10, learn_sigma=True, class_dropout_prob=0.1, latent_scale=None, vae=None,
        name=TESTBED_NAME,
    )
