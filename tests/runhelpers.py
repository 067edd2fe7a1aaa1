"""Helpers shared by the tests that run train.py end to end: the tiny configuration,
and readers for a run directory's checkpoints and metrics."""
import json
import os

import torch

import train

# a model small enough that a step takes milliseconds, on a 200-image built-in set
TINY = ["--model=mu", "--width=32", "--depth=1", "--heads=2", "--patch_size=8",
        "--image_size=32", "--embed_dim=16", "--max_text_len=24", "--batch_size=16",
        "--warmup_steps=2", "--log_every=2", "--eval_every=0", "--eval_batch=64",
        "--synth_images=200", "--lr=2e-3", "--save_minutes=1000"]


def final_state(run_dir):
    """The latest complete checkpoint of a run directory, as plain data."""
    return torch.load(train.ckpt_paths(run_dir)[-1], map_location="cpu", weights_only=True)


def train_losses(run_dir):
    """{step: logged loss} from metrics.jsonl (a resumed run's repeated steps: the last)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                out[r["step"]] = r["loss"]
    return out


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


def check_resume_after_write_kill(ref, rd, rerun):
    """rd's first run died half-way through writing its step-8 checkpoint (saves every 4
    steps, 12 in all): the half-written file never takes a checkpoint's name, and
    rerun() (the same command again) resumes from step 4 and ends bitwise equal to ref."""
    assert os.path.exists(os.path.join(rd, "ckpt_00000008.pt.tmp"))
    assert [os.path.basename(x) for x in train.ckpt_paths(rd)] == ["ckpt_00000004.pt"]
    p = rerun()
    assert "resumed from" in p.stdout and "at step 4" in p.stdout
    assert_bitwise_equal(final_state(ref)["model"], final_state(rd)["model"])
    assert train_losses(ref)[12] == train_losses(rd)[12]
