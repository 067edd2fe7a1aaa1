"""train.py on one process: what these tests prove.

- a few steps on the built-in set leave a complete run directory (config.json,
  metrics.jsonl, a final checkpoint loadable with weights_only=True and free of
  `module.`/`_orig_mod.` prefixes, summary.txt, results.json, curves.png);
- resume is exact: a run SIGKILLed at an arbitrary moment, or killed in the middle of
  writing a checkpoint, and then started again with the same command ends with
  parameters and logged losses bitwise identical to a run that was never interrupted;
- an injected non-finite loss is skipped and counted, and K in a row abort cleanly;
- bad config keys and values fail before anything starts, naming the key;
- --init_from loads strictly and interpolates the position table for a new image size.

Run: python -m pytest -q tests/test_train.py   (about a minute on 2 cores)
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from runhelpers import (TINY, assert_bitwise_equal, check_resume_after_write_kill,  # noqa: E402
                        final_state, train_losses)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import data
    d = str(tmp_path_factory.mktemp("builtin"))
    data.ensure_synth(d, n_images=200)
    return d


def run(args, env_extra=None, check=True, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_smoke_run_directory(tmp_path, data_dir):
    rd = str(tmp_path / "run")
    p = run(TINY + [f"--data_dir={data_dir}", f"--run_dir={rd}", "--steps=4"])
    for name in ("config.json", "metrics.jsonl", "summary.txt", "results.json", "curves.png"):
        assert os.path.isfile(os.path.join(rd, name)), name
    ck = final_state(rd)
    assert ck["step"] == 4
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    res = json.load(open(os.path.join(rd, "results.json")))
    assert set(res) == {"test", "test_comp"}
    assert {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean"} <= set(res["test"])
    assert "step 4/4" in p.stdout and "pairs/s" in p.stdout
    # the checkpoint rebuilds the model and tokenizer exactly
    model, tok, _ = train.E.load_checkpoint(train.ckpt_paths(rd)[-1])
    assert tok.identity() == ck["tokenizer"]


def test_resume_after_kill_is_bitwise_exact(tmp_path, data_dir):
    args = TINY + [f"--data_dir={data_dir}", "--steps=12", "--save_every=4"]
    ref = str(tmp_path / "ref")
    run(args + [f"--run_dir={ref}"])

    # 1) killed while writing the step-8 checkpoint: a half-written file is left behind
    rd = str(tmp_path / "killed_in_write")
    p = run(args + [f"--run_dir={rd}"], {"ONER_FAIL_IN_CHECKPOINT": "8"}, check=False)
    assert p.returncode == -signal.SIGKILL
    check_resume_after_write_kill(ref, rd, lambda: run(args + [f"--run_dir={rd}"]))

    # 2) SIGKILL at an arbitrary moment after the first checkpoint
    rd2 = str(tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args,
                             f"--run_dir={rd2}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not train.ckpt_paths(rd2) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(args + [f"--run_dir={rd2}"])
    assert_bitwise_equal(final_state(ref)["model"], final_state(rd2)["model"])
    assert final_state(ref)["optimizer"]["state"].keys() == final_state(rd2)["optimizer"]["state"].keys()


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, data_dir):
    rd = str(tmp_path / "nan")
    p = run(TINY + [f"--data_dir={data_dir}", f"--run_dir={rd}", "--steps=4"],
            {"ONER_INJECT_NAN": "2"})
    assert "step 2: non-finite loss" in p.stdout
    assert final_state(rd)["counters"]["skipped"] == 1
    assert all(v == v for v in train_losses(rd).values())  # logged averages stay finite
    # K consecutive non-finite steps abort with a message, keeping the checkpoint intact
    rd = str(tmp_path / "nan_abort")
    p = run(TINY + [f"--data_dir={data_dir}", f"--run_dir={rd}", "--steps=8", "--max_skips=1",
                    "--save_every=2"], {"ONER_INJECT_NAN": "3"}, check=False)
    assert p.returncode != 0 and "consecutive non-finite steps" in p.stderr
    assert final_state(rd)["step"] == 2


@pytest.mark.parametrize("argv, msg", [
    (["--stepz=3"], "unknown config key --stepz (did you mean --steps"),
    (["--steps=three"], "--steps='three': expected a int"),
    (["--compile=maybe"], "--compile='maybe': expected a bool"),
    (["--preset=huge"], "--preset='huge'"),
    (["--precision=fp8"], "--precision='fp8'"),
    (["--query_view=noisy"], "query_view='noisy'"),
    (["--model=XL/14"], "unknown size 'XL/14'"),
])
def test_bad_config_is_named(argv, msg):
    with pytest.raises(SystemExit) as e:
        train.resolve(argv)
    assert msg in str(e.value)


def test_overrides_are_typed():
    tc, mc = train.resolve(["--steps", "7", "--compile", "--lr=3e-4", "--xmc=1", "--preset=demo"])
    assert (tc.steps, tc.compile, tc.lr, mc.xmc, mc.width) == (7, True, 3e-4, 1.0, 128)
    tc, mc = train.resolve(["--preset=cc3m"])
    assert (tc.batch_size, tc.epochs, mc.width, mc.depth) == (4096, 40, 768, 12)
    # a named size replaces the preset's architecture, not just the fields it names
    tc, mc = train.resolve(["--model=B/16"])
    assert (mc.width, mc.depth, mc.patch_size, mc.image_size) == (768, 12, 16, 224)
    tc, mc = train.resolve(["--model=S/16", "--image_size=96"])
    assert (mc.width, mc.image_size) == (384, 96)


def test_init_from_loads_strictly_and_interpolates(tmp_path, data_dir):
    rd = str(tmp_path / "pre")
    run(TINY + [f"--data_dir={data_dir}", f"--run_dir={rd}", "--steps=2"])
    ck = train.ckpt_paths(rd)[-1]
    model, tok, raw = train.E.load_checkpoint(ck, image_size=48)
    assert model.student.encoder.pos_image.shape[:2] == (6, 6)
    # the same size reloads bitwise
    same, _, _ = train.E.load_checkpoint(ck)
    assert torch.equal(same.student.encoder.pos_image, raw["model"]["student.encoder.pos_image"])
    # a damaged state dict is refused (strict)
    bad = dict(raw)
    bad["model"] = {k: v for k, v in raw["model"].items() if "mim_head" not in k}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        train.E.load_checkpoint(str(tmp_path / "bad.pt"))
    # fine-tune at a new resolution with different loss terms: runs and evaluates
    ft = str(tmp_path / "ft")
    run(TINY + [f"--data_dir={data_dir}", f"--run_dir={ft}", "--steps=2", f"--init_from={ck}",
                "--image_size=48", "--cmc=0", "--mlm=0", "--mim=0"])
    assert final_state(ft)["model_config"]["image_size"] == 48
