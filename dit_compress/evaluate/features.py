"""The digits feature network: a small CNN trained on the digits train split (held-out
split for its accuracy). It is the testbed's "Inception": registered with torch-fidelity as
``digits-cnn`` so FID / KID / precision / recall / IS run offline, and it is the held-out
classifier behind the class-accuracy figures."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..assets import FEATURES_FILE
from ..data.datasets import digits_arrays
from ..formats.ditc import read_safetensors

EXTRACTOR_NAME = "digits-cnn"
FEATURE_DIM = 128


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x):
        """x: [B, 1, 8, 8] in [-1, 1] -> [B, 128]."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def load_digits_net(path: Path | None = None) -> DigitsNet:
    net = DigitsNet()
    state, _ = read_safetensors(Path(path) if path else FEATURES_FILE)
    net.load_state_dict(state)
    return net.eval()


def train_digits_net(epochs: int = 60, seed: int = 0) -> tuple[DigitsNet, float]:
    """Train on the digits train split (with small shifts as augmentation); returns the
    net and its held-out accuracy."""

    torch.manual_seed(seed)
    xtr, ytr = (torch.from_numpy(a) for a in digits_arrays("train"))
    xte, yte = (torch.from_numpy(a) for a in digits_arrays("test"))
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            xb = xtr[idx]
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    return net, acc


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (torch-fidelity's input) -> float [B, 1, 8, 8] in [-1, 1]."""
    x = images.float().mean(1, keepdim=True) / 255.0
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="area")
    return x * 2 - 1


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity extractor: '128' (penultimate features), 'logits', 'logits_unbiased'."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.net = load_digits_net(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return ("128", "logits", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "128", "kid": "128", "prc": "128"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            feats = self.net.features(images_to_input(x))
            logits = self.net.head(feats)
            out = {"128": feats, "logits": logits, "logits_unbiased": logits - self.net.head.bias}
            return tuple(out[f] for f in self.features_list)

    return DigitsFeatureExtractor


_REGISTERED = False


def register() -> str:
    global _REGISTERED
    if not _REGISTERED:
        from torch_fidelity.registry import (
            FEATURE_EXTRACTORS_REGISTRY,
            register_feature_extractor,
        )

        if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(EXTRACTOR_NAME, _extractor_class())
        _REGISTERED = True
    return EXTRACTOR_NAME


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor, net: DigitsNet | None = None) -> float:
    """Share of images (float [B,1,8,8] in [-1,1]) that the held-out classifier assigns to ``labels``."""
    net = net or load_digits_net()
    return (net(images).argmax(1) == labels).float().mean().item()


def main():  # python -m dit_compress.evaluate.features [OUT]: retrain the shipped feature network

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FEATURES_FILE
    net, acc = train_digits_net()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={"heldout_accuracy": f"{acc:.4f}", "data": "digits train split (1500); held-out split 297"})
    print(f"wrote {out}; held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
