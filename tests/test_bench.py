"""train.py --bench on the tiny size: what this test proves.

- the benchmark mode runs the real training step on synthetic batches and writes every
  figure the README documents to RUN_DIR/bench.json (pairs/s, step time, per-pass
  breakdown, analytic and counted FLOPs, MFU against a measured CPU peak, the OneR vs
  CLIP-mode ratios, the encoder vs torch.nn.TransformerEncoder ratios, the loader);
- the analytic FLOP count agrees with torch's FlopCounterMode within 15 % (the analytic
  count adds the no-grad key passes, elementwise work is not counted by either), and
  OneR's FLOPs exceed the CLIP-mode step's;
- pass_tokens lists exactly the passes the config runs.
It asserts no speed: timings depend on the machine.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_bench.py   (about 15 s)
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from oner import OneRConfig  # noqa: E402
from runhelpers import TINY  # noqa: E402

KEYS = {"step_s", "pairs_per_s", "flops_per_pair", "flops_per_pair_by_pass", "flops_per_pair_counted",
        "achieved_tflops", "peak_tflops", "mfu", "breakdown_s", "clip_step_s",
        "time_ratio_oner_over_clip", "flop_ratio_oner_over_clip", "step_time_over_flop_budget",
        "encoder_train_ratio", "encoder_infer_ratio", "recompiles_after_warmup",
        "sdpa_kernel_image_pass", "loader"}


def test_bench_writes_every_figure(tmp_path):
    import data
    d = str(tmp_path / "builtin")
    data.ensure_synth(d, n_images=200)
    rd = str(tmp_path / "bench")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--bench",
                        "--bench_steps=2", f"--data_dir={d}", f"--run_dir={rd}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.load(open(os.path.join(rd, "bench.json")))
    assert KEYS <= set(res), KEYS - set(res)
    assert 0.85 < res["flops_per_pair_counted"] / res["flops_per_pair"] < 1.15
    assert res["flop_ratio_oner_over_clip"] > 1
    # the default config (clean queries, m = 0): masked passes for MLM/MIM, clean passes for
    # the queries, which are also the keys (no key passes)
    for k in ("student_image_fwd", "student_text_fwd", "student_joint_fwd", "clean_image_fwd",
              "clean_text_fwd", "clean_joint_fwd", "backward", "optimizer_ema"):
        assert res["breakdown_s"][k] >= 0
    assert "key_passes" not in res["breakdown_s"]
    assert [r["workers"] for r in res["loader"]] == [0, 1, 2]
    for line in ("pairs/s", "FLOPs/pair", "MFU", "OneR vs CLIP-mode", "TransformerEncoder", "loader"):
        assert line in p.stdout


def test_pass_tokens_follow_the_config():
    P, L = 16, 24
    cfg = OneRConfig.from_name("mu", patch_size=8, max_text_len=L, momentum=0.99, query_view="masked")
    assert train.pass_tokens(cfg) == {"student_image": (1 + P, True), "student_text": (1 + L, True),
                                      "student_joint": (1 + P + L, True),
                                      "key_image": (1 + P, False), "key_text": (1 + L, False)}
    clip = OneRConfig.from_name("mu", patch_size=8, max_text_len=L, cmc=0, mlm=0, mim=0,
                                momentum=0, query_view="clean")
    assert train.pass_tokens(clip) == {"clean_image": (1 + P, True), "clean_text": (1 + L, True)}
    default = OneRConfig.from_name("mu", patch_size=8, max_text_len=L)   # clean queries, m = 0
    assert train.pass_tokens(default) == {"student_image": (1 + P, True), "student_text": (1 + L, True),
                                          "student_joint": (1 + P + L, True), "clean_image": (1 + P, True),
                                          "clean_text": (1 + L, True), "clean_joint": (1 + P + L, True)}
    cic = OneRConfig.from_name("mu", patch_size=8, max_text_len=L, cic=1)
    assert train.pass_tokens(cic)["cross"] == (2 + P + L, True)
