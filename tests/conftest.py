"""Shared test setup: make the repo root importable, keep torch single-threaded
and deterministic so the suite behaves the same on every 2-core CI machine."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)
