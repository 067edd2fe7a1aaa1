"""Fine-tuned retrieval, the small version of the poster's fine-tuned row (METHOD.md §6).

Proves the documented path works as two commands with nothing else in between:
  1. `train.py` pretrains a tiny model on the built-in set (2 steps);
  2. `train.py --init_from CKPT --data train.json --image_root DIR --eval_data val.json
     --eval_every 2` fine-tunes it on the ALBEF/BLIP JSON files of the built-in set and
     keeps `best.pt`, chosen on val;
  3. `eval.py --checkpoint best.pt --builtin DIR` reports zero-shot-protocol retrieval on
     the test splits, recording which checkpoint it was fine-tuned from.
(The full-scale commands use coco_karpathy_{train,val,test}.json the same way.)

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval_finetune.py   (about 15 s)
"""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runhelpers import TINY  # noqa: E402


def run(script, args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_finetune_then_evaluate_best_checkpoint(tmp_path):
    import data
    paths = data.ensure_synth(str(tmp_path / "builtin"), n_images=200)
    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    run("train.py", TINY + [f"--data_dir={paths['root']}", f"--run_dir={pre}", "--steps=2", "--eval_every=0"])
    init = os.path.join(pre, "ckpt_00000002.pt")
    run("train.py", TINY + [f"--init_from={init}", f"--data={paths['train']}", f"--image_root={paths['image_root']}",
                            f"--eval_data={paths['val']}", "--eval_every=2", "--steps=4", f"--run_dir={ft}"])
    best = os.path.join(ft, "best.pt")
    ck = torch.load(best, map_location="cpu", weights_only=True)
    # best.pt is the validation (steps 2 and 4) with the highest mean recall, the first on ties
    vals = [json.loads(line) for line in open(os.path.join(ft, "metrics.jsonl"))]
    vals = [r for r in vals if r.get("kind") == "val"]
    assert [r["step"] for r in vals] == [2, 4]
    want = max(vals, key=lambda r: (r["mean"], -r["step"]))
    assert ck["step"] == want["step"] and ck["best"] == want["mean"]
    assert ck["train_config"]["init_from"] == init
    out = str(tmp_path / "ft_eval.json")
    p = run("eval.py", ["--checkpoint", best, "--builtin", paths["root"], "--out", out, "--quiet"])
    res = json.load(open(out))
    assert res["fine_tuned_from"] == init and res["step"] == want["step"]
    assert set(res["retrieval"]) == {"builtin test", "builtin test_comp"}
    for r in res["retrieval"].values():
        assert {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean"} <= set(r) and r["n_texts"] == 100
    assert "zero-shot retrieval" in p.stdout
