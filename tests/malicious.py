"""The one deliberate unpickling in the repo: tests use it as the oracle that a payload file really runs code when
loaded without weights_only (so a test that sees our readers refuse it is not vacuous). Never use it on real data."""
import torch


def unpickle_unsafely(path):
    return torch.load(path, weights_only=False)
