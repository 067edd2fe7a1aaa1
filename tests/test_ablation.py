"""ablation.py (issue 7's ablation launcher): what these tests prove.

- the 8 rows are the issue's table: each sets exactly the contrastive terms, MLM/MIM,
  heads and query view its name says, and nothing else differs between rows; the keys
  that define rows cannot be overridden for all rows; every row's train.py command shares
  the same data, steps, batch and seed;
- ablation.py launches train.py as a subprocess and never imports it;
- `python ablation.py --quick` runs end to end (2 rows, 6 steps, tiny model, built-in set
  of 200 images): every run directory holds a checkpoint at step 6, results.json and
  ablation_eval.json, and the out dir holds ablation.json (TR/IR@1/5 on test and
  test_comp, zero-shot, linear probe, modality gap per row, each within its range),
  ablation.md (tables, command, commit, machine, wall time) and gap.png (one panel per row);
- rerunning is resumable: finished runs are skipped, a run that lost only its evaluation
  is re-evaluated without retraining, --collect tabulates without training, and a
  different command on the same out dir is refused before anything runs;
- mean and sample std over seeds are aggregated correctly (hand-made evaluation files).

The gap metrics themselves (known gap, no gap, misaligned input) and the PCA figure are
tested on hand-built embeddings in tests/test_eval_metrics.py and tests/test_eval_embed.py;
they are not repeated here.

Run: python -m pytest -q tests/test_ablation.py   (about a minute on 2 cores)
"""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ablation  # noqa: E402

# the issue's table: contrastive terms, MLM+MIM on, heads, query view
ISSUE_TABLE = {
    "itc_two_heads": ({"itc"}, True, "two", "masked"),
    "itc": ({"itc"}, True, "one", "masked"),
    "itc_xmc": ({"itc", "xmc"}, True, "one", "masked"),
    "itc_xmc_cic": ({"itc", "xmc", "cic"}, True, "one", "masked"),
    "oner": ({"itc", "cmc"}, True, "one", "masked"),
    "itc_xmc_cmc": ({"itc", "xmc", "cmc"}, True, "one", "masked"),
    "oner_no_mlm_mim": ({"itc", "cmc"}, False, "one", "masked"),
    "oner_clean_queries": ({"itc", "cmc"}, True, "one", "clean"),
}


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_ablation(args, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "ablation.py"), *args], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"ablation.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def argv_dict(argv):
    return dict(a[2:].split("=", 1) for a in argv)


def test_rows_are_the_issue_table():
    assert [r[0] for r in ablation.ROWS] == list(ISSUE_TABLE)
    opts, extras = ablation.parse_args([])
    shared = ablation.train_settings(opts, extras)
    cmds = {}
    for name, (terms, masked, heads, view) in ISSUE_TABLE.items():
        a = argv_dict(ablation.train_argv(opts, shared, name, 0))
        assert {t for t in ("itc", "xmc", "cic", "cmc") if float(a[t]) > 0} == terms, name
        assert (float(a["mlm"]) > 0, float(a["mim"]) > 0) == (masked, masked), name
        assert a["two_heads"] == ("true" if heads == "two" else "false"), name
        assert a["query_view"] == view, name
        cmds[name] = a
    # nothing but the row keys differs between rows (same data, steps, batch, seed)
    common = [{k: v for k, v in a.items() if k not in ablation.ROW_KEYS + ("run_dir",)} for a in cmds.values()]
    assert all(c == common[0] for c in common)
    assert common[0]["steps"] == str(ablation.STEPS) and common[0]["seed"] == "0"


def test_cli_parsing_and_refusals():
    opts, extras = ablation.parse_args(["--quick", "--lr=3e-3", "--momentum", "0.9"])
    assert opts["rows"] == ["itc", "oner"] and opts["seeds"] == [0]
    assert extras == {"lr": "3e-3", "momentum": "0.9"}
    shared = ablation.train_settings(opts, extras)
    assert shared["lr"] == "3e-3" and shared["steps"] == 6            # extras win over the mode's defaults
    opts, _ = ablation.parse_args(["--rows", "oner,itc", "--seeds", "1,2", "--steps", "7"])
    assert opts["rows"] == ["itc", "oner"] and opts["seeds"] == [1, 2]  # table order
    assert ablation.train_settings(opts, {})["steps"] == 7
    for bad in (["--cmc=0"], ["--two_heads"], ["--seed=3"], ["--rows=nope"], ["stray"]):
        with pytest.raises(SystemExit):
            ablation.parse_args(bad)


def test_study_rows_change_one_factor_each():
    """--study collapse|choices: each row differs from its study's base row only in the keys
    its overrides name, one seed by default, and its factors cannot be set as shared extras."""
    for study, base in (("collapse", "itc"), ("choices", "oner")):
        opts, extras = ablation.parse_args(["--study", study])
        assert opts["seeds"] == [0] and opts["out"].endswith(f"study_{study}")
        shared = ablation.train_settings(opts, extras)
        ref = argv_dict(ablation.train_argv(opts, shared, base, 0))
        for name, _, over in ablation.STUDIES[study]:
            a = argv_dict(ablation.train_argv(opts, shared, name, 0))
            differ = {k for k in set(a) | set(ref) if a.get(k) != ref.get(k)} - {"run_dir"}
            expected = {k for k, v in {**ablation.BASE, **over}.items()
                        if ablation.fmt_value(v) != ref.get(k)}
            assert differ == expected, (study, name, differ)
    assert argv_dict(ablation.train_argv(opts, shared, "m0", 0))["momentum"] == "0"  # row wins over LAPTOP
    opts, _ = ablation.parse_args(["--study", "collapse"])
    assert "itc_two_heads_mocov3" not in opts["rows"]               # only under a collapsing condition
    for bad in (["--study", "nope"], ["--study", "choices", "--temperature=fixed"],
                ["--study", "collapse", "--rows=oner"]):
        with pytest.raises(SystemExit):
            ablation.parse_args(bad)


def test_study_table_leads_with_val(tmp_path):
    opts, _ = ablation.parse_args(["--study=choices", "--rows=oner,m0", f"--out={tmp_path}"])
    for name, v in (("oner", 30.0), ("m0", 45.0)):
        path = os.path.join(ablation.run_dir(opts, name, 0), ablation.EVAL_FILE)
        _write_eval(path, 20.0, 100.0)
        ev = json.load(open(path))
        ev.update(val={"mean": v}, train_last={"acc_i2t": 0.5, "loss": 1.0})
        json.dump(ev, open(path, "w"))
    [(_, header, body)] = ablation.tables(ablation.aggregate(opts), builtin=True, study=True)
    assert header[2] == "val mean R" and [r[2] for r in body] == ["30.0", "45.0"]
    assert body[0][header.index("train in-batch acc")] == "50.0"


def test_launcher_does_not_import_train():
    code = "import sys, ablation; assert 'train' not in sys.modules, 'ablation imported train'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=env())


def test_dry_run_prints_one_train_command_per_row_and_seed(tmp_path):
    p = run_ablation(["--dry_run", "--seeds", "0,1", "--out", str(tmp_path / "d")])
    lines = [line for line in p.stdout.splitlines() if line.startswith("python train.py")]
    assert len(lines) == 16
    assert not (tmp_path / "d").exists()                              # nothing written


def _write_eval(path, tr1, sep):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"builtin": {"retrieval": {"test": {"tr1": tr1}}, "zeroshot": {"top1": 10.0}},
                   "gap": {"separability": sep, "centroid_distance": 0.5}}, f)


def test_aggregate_mean_and_sample_std(tmp_path):
    opts, _ = ablation.parse_args(["--rows=itc,oner", "--seeds=0,1,2", f"--out={tmp_path}"])
    for s, tr1 in zip((0, 1, 2), (10.0, 20.0, 30.0)):
        _write_eval(os.path.join(ablation.run_dir(opts, "itc", s), ablation.EVAL_FILE), tr1, 100.0)
    _write_eval(os.path.join(ablation.run_dir(opts, "oner", 0), ablation.EVAL_FILE), 40.0, 50.0)
    rows = ablation.aggregate(opts)
    st = rows["itc"]["metrics"]["retrieval.test.tr1"]
    assert (st["mean"], st["std"], st["n"]) == (20.0, 10.0, 3)
    assert rows["oner"]["seeds"] == [0] and rows["oner"]["metrics"]["gap.separability"]["std"] == 0.0
    (_, header, body), _ = ablation.tables(rows, builtin=True)
    assert body[0][header.index("test TR@1")] == "20.0 ± 10.0"
    assert body[1][header.index("test TR@1")] == "40.0"                # one seed: no spread shown
    assert body[1][header.index("test IR@1")] == "-"                   # missing number, not 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("abl") / "out")
    p = run_ablation(["--quick", "--out", out])
    return out, p


def test_quick_end_to_end(quick):
    out, p = quick
    assert "test TR@1" in p.stdout and "separability" in p.stdout
    res = json.load(open(os.path.join(out, "ablation.json")))
    assert set(res["rows"]) == {"itc", "oner"}
    assert res["statuses"] == {"itc/seed0": "ok", "oner/seed0": "ok"}
    for name, row in res["rows"].items():
        assert row["seeds"] == [0]
        m = row["metrics"]
        for split in ("test", "test_comp"):
            for k in ("tr1", "tr5", "ir1", "ir5"):
                assert 0 <= m[f"retrieval.{split}.{k}"]["mean"] <= 100
        for k in ("zeroshot.top1", "linear_probe.top1", "gap.separability", "val.mean"):
            assert 0 <= m[k]["mean"] <= 100, k
        assert 0 <= m["gap.centroid_distance"]["mean"] <= 2
        for k in ("gap.matched_cos", "gap.random_cos"):
            assert -1 <= m[k]["mean"] <= 1
        rd = os.path.join(out, name, "seed0")
        ev = json.load(open(os.path.join(rd, ablation.EVAL_FILE)))
        assert ev["step"] == 6 and ev["checkpoint"] == "ckpt_00000006.pt"
        assert ev["gap"]["n_pairs"] == 20                            # 200 images -> 20 test images
        assert os.path.isfile(os.path.join(rd, "results.json"))
        cfg = json.load(open(os.path.join(rd, "config.json")))
        assert cfg["model"]["cmc"] == (1.0 if name == "oner" else 0.0)
        assert cfg["model"]["width"] == 32 and cfg["train"]["steps"] == 6
    md = open(os.path.join(out, "ablation.md")).read()
    for s in ("python ablation.py --quick", res["git"]["sha"], "usable cores", "Wall time", "| ITC |",
              "| + CMC (OneR) |", "separability"):
        assert s in md, s
    with Image.open(os.path.join(out, "gap.png")) as im:
        assert im.size == (2 * 320, 320 + 24 + 22)                    # one panel per row


def test_rerun_skips_finished_and_only_reevaluates(quick):
    out, _ = quick
    itc, oner = os.path.join(out, "itc", "seed0"), os.path.join(out, "oner", "seed0")
    before = {d: open(os.path.join(d, "train.log")).read() for d in (itc, oner)}
    itc_eval = open(os.path.join(itc, ablation.EVAL_FILE)).read()
    os.remove(os.path.join(oner, ablation.EVAL_FILE))                 # as if killed during evaluation
    p = run_ablation(["--quick", "--out", out])
    assert "itc seed 0: done" in p.stdout and "oner seed 0: ok" in p.stdout
    assert "train " not in p.stdout                                   # nothing retrained
    for d in (itc, oner):
        assert open(os.path.join(d, "train.log")).read() == before[d]
    assert open(os.path.join(itc, ablation.EVAL_FILE)).read() == itc_eval
    assert os.path.isfile(os.path.join(oner, ablation.EVAL_FILE))
    # --collect never trains: it tabulates what is finished, whatever the command now says
    p = run_ablation(["--out", out, "--rows=itc,oner", "--seeds=0,1", "--collect"])
    assert "itc seed 0: done" in p.stdout and "itc seed 1: not finished" in p.stdout
    assert not os.path.exists(os.path.join(out, "itc", "seed1"))
    # a different command on the same out dir is refused before anything runs
    p = run_ablation(["--quick", "--out", out, "--steps", "7"], check=False)
    assert p.returncode != 0 and "trained with other settings" in p.stderr


def test_quick_study_with_mocov3_head_reports_the_training_view(tmp_path):
    """A mocov3-head run is also scored the way its training loss sees it (predictor on the
    image queries, per-batch BatchNorm statistics); the running statistics survive that."""
    out = str(tmp_path / "s")
    run_ablation(["--quick", "--study", "collapse", "--rows", "itc_mocov3_head", "--out", out])
    ev = json.load(open(os.path.join(out, "itc_mocov3_head", "seed0", ablation.EVAL_FILE)))
    assert 0 <= ev["val_train_view"]["mean"] <= 100 and "val" in ev and "train_last" in ev
    assert set(ev["val_train_view_parts"]) == {"predictor_only", "batch_stats_only"}
    md = open(os.path.join(out, "ablation.md")).read()
    assert "study 'collapse'" in md and "val mean R, training view" in md
    import torch
    import eval as E
    model, _, _ = E.load_checkpoint(os.path.join(out, "itc_mocov3_head", "seed0", ev["checkpoint"]))
    bn = model.student.heads["shared"][1]
    assert bn.running_mean is not None and bn.num_batches_tracked > 0
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
