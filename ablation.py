"""The poster's ablation (issue 7): 8 rows x seeds, each row one `python train.py` run.

    python ablation.py                          # laptop: 8 rows x 3 seeds, built-in set, 2 CPU cores
    python ablation.py --quick                  # 2 rows, 6 steps, tiny model, < 1 min (the test suite runs it)
    python ablation.py --rows itc,oner --seeds 0 --steps 300 --out runs/abl_try
    python ablation.py --preset cc3m --data cc3m.json --image_root /data/cc3m \\
        --eval_data coco_val.json --eval_image_root /data/coco --out runs/ablation_cc3m \\
        --slurm --nodes 4 --gpus_per_node 8 --partition gpu      # each row becomes one SLURM job
    python ablation.py --collect --out runs/ablation_cc3m        # later: evaluate + tabulate finished rows
    python ablation.py --study collapse      # one factor at a time on one-head ITC (MoCo v3 head, tau, m, ...)
    python ablation.py --study choices       # settle m, temperature, mask ratio, query view on val

Options: --quick  --seeds 0,1,2  --steps N  --parallel 2  --rows name,...  --preset demo|cc3m
--out DIR (default runs/ablation, runs/ablation_quick, runs/ablation_<preset>)  --collect (never train; evaluate and tabulate what is finished)
--dry_run (print the train.py commands and exit)  --study collapse|choices (STUDIES below:
one seed, a val column, out runs/study_NAME; rows past a study's first 8 run only when
named in --rows). Every other --key=value is passed to every train.py run unchanged (same
data, steps, batch and seeds for all rows); the keys that define the rows (itc xmc cic cmc
mlm mim two_heads query_view, and a study's factors) are refused there.

Rows (ROWS below): each changes only what its name says. All keep MLM + MIM on except
"oner_no_mlm_mim"; everything else (momentum, temperature, mask ratio, ...) is the
OneRConfig / preset default, identical across rows.

What happens per (row, seed), as two single-thread subprocesses at a time (--parallel):
  1. `python train.py --preset P --run_dir OUT/ROW/seedS --seed=S [size/steps] [extras] [row]`
     with OMP_NUM_THREADS=1; log in OUT/ROW/seedS/train.log. train.py resumes an
     interrupted run from its latest checkpoint, and a run with results.json is not rerun.
  2. `python ablation.py _eval OUT/ROW/seedS` (log: eval.log): loads the final checkpoint
     (the last step; every row is evaluated after the same number of steps, no checkpoint
     is picked on test) and writes ablation_eval.json: eval.evaluate_builtin (TR/IR@K on
     test and test_comp, zero-shot classification, linear probe, ...), val retrieval,
     and eval.modality_gap on the test split (each test image and its first caption,
     through the key/evaluation encoder: encode_image / encode_text), plus ~200 test
     items' image, text and encode_pair embeddings for the figure (gap_embeddings.pt).
     A (row, seed) whose ablation_eval.json exists is skipped: an interrupted ablation
     continues where it stopped. A run directory made by a different command is refused.
Then: mean +- sample std over seeds, printed, and OUT/ablation.json, OUT/ablation.md
(command, git commit, machine, wall time) and OUT/gap.png (one PCA panel per row, seed 0).

Laptop budget (LAPTOP below): width 96, depth 3, 4 heads, 8 px patches on 32 px images
(16 patches), embed 128, batch 64, 500 steps (3.2 epochs of the 10,000-image set), final
checkpoint evaluated. Measured (OMP_NUM_THREADS=1, two lanes on an otherwise idle 2-core
Xeon): median step 0.26-0.28 s for ITC, +XMC, +CMC, +XMC+CMC and two heads, 0.24 s
without MLM/MIM, 0.37 s +XMC+CIC (cross-only pass), 0.47 s clean queries (extra clean
passes); a run is 126-243 s of train.py (incl. start-up and its own test retrieval) plus
21-25 s of evaluation; one seed of 8 rows took 12.6 min, so 8 rows x 3 seeds ~38 min.
The full run under a third engineer's process for its first third took 48.9 min.
Jobs start in seed order, the costliest rows of a seed first (ROW_COST), to even the lanes.

Full scale (--preset cc3m): ViT-B/16, CC3M, 40 epochs at global batch 4096 (SLIP/OneR
protocol). Each row is one `python train.py --preset cc3m ... --run_dir OUT/ROW/seedS`
command (see --dry_run); add train.py's --slurm options and every row is submitted as
its own job, then `--collect` evaluates the finished rows. Expected cost per row and
seed, from the paper's scale (estimate, not measured here): CC3M ~3.3M pairs / 4096 x 40
epochs ~ 32k steps = 1.3e8 pairs; a OneR step runs ~1,600 token-passes of ViT-B/16 per
pair (uni image 197 + text 32 + joint 229 tokens with gradients, x3; the key encoder's
229 without) at ~0.17 GFLOP per token-pass, ~2.8e11 FLOP per pair, ~3.6e19 FLOP per run:
~80 A100-hours at 40 % MFU (bf16), i.e. ~10 h on 8 A100s or ~3 h on 32; ITC-only rows
cost ~0.6x, +XMC+CIC ~1.3x, clean queries ~1.6x. All 24 runs: ~2,000 A100-hours.
Measure your hardware first: `python train.py --bench --model B/16 --batch_size 256`.
At cc3m scale the built-in evaluation does not apply: rows are scored by retrieval and
the modality gap on --eval_data (e.g. COCO 5k), and ImageNet zero-shot by
`python eval.py --checkpoint OUT/ROW/seedS/ckpt_*.pt --zeroshot imagenet/val`.
"""
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.abspath(__file__))

# (name, label, overrides). Every row sets all the keys in ROW_KEYS, so no row inherits
# a term from the preset by accident.
BASE = dict(itc=1.0, xmc=0.0, cic=0.0, cmc=0.0, mlm=1.0, mim=1.0, two_heads=False, query_view="masked")
ROWS = [
    ("itc_two_heads", "ITC (two heads)", dict(two_heads=True)),
    ("itc", "ITC", dict()),
    ("itc_xmc", "+ XMC", dict(xmc=1.0)),
    ("itc_xmc_cic", "+ XMC + CIC", dict(xmc=1.0, cic=1.0)),
    ("oner", "+ CMC (OneR)", dict(cmc=1.0)),
    ("itc_xmc_cmc", "+ XMC + CMC", dict(xmc=1.0, cmc=1.0)),
    ("oner_no_mlm_mim", "OneR w/o MLM/MIM", dict(cmc=1.0, mlm=0.0, mim=0.0)),
    ("oner_clean_queries", "OneR, clean queries", dict(cmc=1.0, query_view="clean")),
]
ROW_KEYS = tuple(BASE)
# measured median step time (ms, one thread) of each row: only used to start costly rows first
ROW_COST = dict(itc_two_heads=270, itc=275, itc_xmc=270, itc_xmc_cic=370, oner=265, itc_xmc_cmc=265,
                oner_no_mlm_mim=240, oner_clean_queries=465)
QUICK_ROWS = ("itc", "oner")

# --study: one factor at a time, one seed, the same harness and laptop settings. Each entry
# (name, label, overrides) is applied on top of BASE; keys outside ROW_KEYS (momentum,
# temperature, width, ...) replace the shared laptop value for that run only.
# "collapse": does the one-head ITC row collapse under MoCo v3 lineage conditions?
# "choices": settle the open [choice]s on the OneR row (ITC + CMC + MLM + MIM), on val.
ONER = dict(cmc=1.0)
STUDIES = {
    "collapse": [
        ("itc", "ITC, one head (base)", dict()),
        ("itc_fixed_t02", "fixed tau 0.2", dict(temperature="fixed", temp_fixed=0.2)),
        ("itc_mocov3_head", "MoCo v3 head + predictor", dict(head_type="mocov3")),
        ("itc_mocov3", "MoCo v3 head + predictor + fixed tau 0.2",
         dict(head_type="mocov3", temperature="fixed", temp_fixed=0.2)),
        ("itc_m0", "m = 0", dict(momentum=0.0)),
        ("itc_no_masking", "masking off (no MLM/MIM)", dict(mlm=0.0, mim=0.0)),
        ("itc_depth6", "depth 6", dict(depth=6)),
        ("itc_width192", "width 192", dict(width=192)),
        # the ablation's rows under the condition that collapses one-head ITC (MoCo v3 head)
        ("itc_two_heads_mocov3", "ITC two heads, MoCo v3 head", dict(two_heads=True, head_type="mocov3")),
        ("itc_xmc_mocov3", "+ XMC, MoCo v3 head", dict(xmc=1.0, head_type="mocov3")),
        ("oner_mocov3", "+ CMC (OneR), MoCo v3 head", dict(cmc=1.0, head_type="mocov3")),
        ("itc_xmc_cmc_mocov3", "+ XMC + CMC, MoCo v3 head", dict(xmc=1.0, cmc=1.0, head_type="mocov3")),
    ],
    "choices": [
        ("oner", "OneR (m 0.99, per-term tau, r 0.4, masked queries)", ONER),
        ("m0", "m = 0", {**ONER, "momentum": 0.0}),
        ("m0999", "m = 0.999", {**ONER, "momentum": 0.999}),
        ("temp_shared", "shared tau", {**ONER, "temperature": "shared"}),
        ("temp_fixed", "fixed tau 0.2", {**ONER, "temperature": "fixed", "temp_fixed": 0.2}),
        ("mask02", "image mask ratio 0.2", {**ONER, "image_mask_ratio": 0.2}),
        ("mask06", "image mask ratio 0.6", {**ONER, "image_mask_ratio": 0.6}),
        ("clean_queries", "clean queries", {**ONER, "query_view": "clean"}),
        # the winners on val together (run after the one-factor rows): the new defaults
        ("chosen", "chosen together: m 0, r 0.2, clean queries",
         {**ONER, "momentum": 0.0, "image_mask_ratio": 0.2, "query_view": "clean"}),
        # clean queries cost 1.69x the FLOPs of a step (train.flops_per_pair): the masked view
        # with the other winners, given as many FLOPs (846 steps instead of 500)
        ("chosen_masked_equal_flops", "m 0, r 0.2, masked queries, 846 steps (equal FLOPs)",
         {**ONER, "momentum": 0.0, "image_mask_ratio": 0.2, "steps": 846}),
    ],
}
STUDY_DEFAULT_ROWS = {k: [r[0] for r in rows[:8]] for k, rows in STUDIES.items()}  # the rest: by --rows
ROW_COST.update(itc_depth6=540, itc_width192=800, itc_mocov3=300, itc_mocov3_head=300, clean_queries=465)


def table(opts):
    """The row list of this invocation: the poster's ablation, or a --study's."""
    return STUDIES[opts["study"]] if opts.get("study") else ROWS


def row_keys(opts):
    """Keys the rows set (refused as shared extras): ROW_KEYS plus a study's factors."""
    return tuple(dict.fromkeys(ROW_KEYS + tuple(k for r in table(opts) for k in r[2])))

STEPS = 500
# laptop size (applied with --preset demo unless overridden by an extra --key=value)
# lr, momentum and image mask ratio pinned to what the recorded laptop tables ran with (the
# demo preset's lr/momentum and the global m, r and query-view defaults changed afterwards,
# the last three on the evidence of --study choices)
LAPTOP = dict(patch_size=8, width=96, depth=3, heads=4, batch_size=64, steps=STEPS, warmup_steps=50,
              lr=1e-3, momentum=0.99, image_mask_ratio=0.4, eval_every=0, log_every=50, save_every=100,
              save_minutes=1000)
QUICK = dict(model="mu", width=32, depth=1, heads=2, patch_size=8, image_size=32, embed_dim=16,
             max_text_len=24, batch_size=16, steps=6, warmup_steps=2, lr=2e-3, log_every=2,
             eval_every=0, eval_batch=64, synth_images=200, save_minutes=1000)
# train.py's TrainConfig defaults for the built-in set (read only to make the data once,
# before the parallel runs start, instead of in two processes at once)
DEFAULT_DATA_DIR, DEFAULT_SYNTH_IMAGES = "data/builtin", 10000

GAP_FIGURE_ITEMS = 200
EVAL_FILE, ROW_FILE, GAP_FILE = "ablation_eval.json", "ablation_row.json", "gap_embeddings.pt"

# (json path in the aggregated row, column label); the table reports test, never val
RETRIEVAL_COLS = [(f"retrieval.{s}.{k}", f"{s} {k.upper()[:2]}@{k[2:]}")
                  for s in ("test", "test_comp") for k in ("tr1", "tr5", "ir1", "ir5")]
OTHER_COLS = [("zeroshot.top1", "zero-shot top1"), ("zeroshot.shape.top1", "zs shape"),
              ("zeroshot.colour.top1", "zs colour"), ("linear_probe.top1", "probe top1"),
              ("gap.centroid_distance", "centroid dist"), ("gap.matched_cos", "cos matched"),
              ("gap.random_cos", "cos random"), ("gap.separability", "separability %")]
VAL_COL = ("val.mean", "val mean R")
# a --study selects on val, so its one table leads with val; train acc is the last logged
# in-batch image->text accuracy (does the training task itself collapse, or only evaluation?)
STUDY_COLS = [VAL_COL, ("retrieval.test.tr1", "test TR@1"), ("retrieval.test.ir1", "test IR@1"),
              ("retrieval.test_comp.tr1", "test_comp TR@1"), ("retrieval.test_comp.ir1", "test_comp IR@1"),
              ("zeroshot.top1", "zero-shot top1"), ("linear_probe.top1", "probe top1"),
              ("train.acc_i2t", "train in-batch acc"), ("val_train_view.mean", "val mean R, training view"),
              ("val_train_view_parts.predictor_only.mean", "... predictor only"),
              ("val_train_view_parts.batch_stats_only.mean", "... per-modality BN only"),
              ("gap.separability", "separability %")]


def usage(msg):
    raise SystemExit(f"error: {msg}\nusage: python ablation.py [--quick] [--seeds 0,1,2] [--steps N] "
                     "[--parallel 2] [--out DIR] [--rows a,b] [--preset demo|cc3m] [--collect] "
                     "[--dry_run] [--study collapse|choices] [train.py --key=value ...]\nrows: "
                     + ", ".join(r[0] for r in ROWS)
                     + "".join(f"\n--study {k} rows: " + ", ".join(r[0] for r in v) for k, v in STUDIES.items()))


def parse_args(argv):
    """-> (options dict, extra train.py overrides as an ordered dict of strings)."""
    opts = dict(quick=False, seeds=None, steps=None, parallel=2, out=None, rows=None, preset="demo",
                collect=False, dry_run=False, study=None)
    flags = ("quick", "collect", "dry_run")
    extras, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            usage(f"unexpected argument {arg!r}; use --key=value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key not in flags and nxt is not None and not nxt.startswith("--"):
                val, i = nxt, i + 1
            else:
                val = "true"
        i += 1
        if key in opts:
            opts[key] = val
        else:
            extras[key] = val
    for f in flags:
        opts[f] = str(opts[f]).lower() in ("1", "true", "yes", "on")
    if opts["study"] is not None and opts["study"] not in STUDIES:
        usage(f"--study={opts['study']}: expected one of {sorted(STUDIES)}")
    keys = row_keys(opts)
    bad = sorted(set(extras) & set(keys + ("run_dir", "seed")))
    if bad:
        usage(f"--{bad[0]} is set by the ablation itself (row keys {', '.join(keys)}; run_dir; seed)")
    try:
        opts["parallel"] = max(1, int(opts["parallel"]))
        one = opts["quick"] or opts["study"]
        opts["seeds"] = [int(s) for s in str(opts["seeds"] or ("0" if one else "0,1,2")).split(",")]
        opts["steps"] = int(opts["steps"]) if opts["steps"] is not None else None
    except ValueError as e:
        usage(str(e))
    names = [r[0] for r in table(opts)]
    default_rows = STUDY_DEFAULT_ROWS.get(opts["study"], names)
    rows = opts["rows"].split(",") if opts["rows"] else list(QUICK_ROWS if opts["quick"] else default_rows)
    unknown = [r for r in rows if r not in names]
    if unknown:
        usage(f"unknown row(s) {unknown}")
    opts["rows"] = [r for r in names if r in rows]               # table order
    # absolute, so train.py (run from the repo root) and this process agree on every path
    default = "ablation_quick" if opts["quick"] else "ablation" if opts["preset"] == "demo" \
        else f"ablation_{opts['preset']}"
    if opts["study"]:
        default = f"study_{opts['study']}" + ("" if opts["preset"] == "demo" else f"_{opts['preset']}")
    opts["out"] = os.path.abspath(opts["out"] or os.path.join(ROOT, "runs", default))
    opts["slurm"] = str(extras.get("slurm", "false")).lower() in ("1", "true", "yes", "on")
    return opts, extras


def fmt_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def train_settings(opts, extras):
    """Ordered train.py overrides shared by every row: the size/steps defaults of the mode,
    then the user's extras (which win), then --steps."""
    base = {}
    if opts["quick"]:
        base.update(QUICK, data_dir=os.path.join(opts["out"], "data"))
    elif opts["preset"] == "demo":
        base.update(LAPTOP)
    base.update(extras)
    if opts["steps"] is not None:
        base["steps"] = opts["steps"]
    return base


def train_argv(opts, shared, row, seed):
    name, _, over = next(r for r in table(opts) if r[0] == row)
    cfg = {**BASE, **over}
    args = [f"--preset={opts['preset']}", f"--run_dir={run_dir(opts, row, seed)}", f"--seed={seed}"]
    args += [f"--{k}={fmt_value(v)}" for k, v in shared.items() if k not in cfg]
    args += [f"--{k}={fmt_value(v)}" for k, v in cfg.items()]
    return args


def run_dir(opts, row, seed):
    return os.path.join(opts["out"], row, f"seed{seed}")


def builtin_data(opts, shared):
    """(data_dir, n_images) when the runs use the built-in set, else None."""
    if shared.get("data", "builtin") != "builtin":
        return None
    return shared.get("data_dir", DEFAULT_DATA_DIR), int(shared.get("synth_images", DEFAULT_SYNTH_IMAGES))


# ----------------------------------------------------------------------------- one job
def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_logged(cmd, log_path):
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT).returncode


def job(opts, row, seed, argv, say):
    """Train (unless finished) then evaluate one (row, seed); returns a status string."""
    rd = run_dir(opts, row, seed)
    if os.path.isfile(os.path.join(rd, EVAL_FILE)):
        return "done"
    times = {}
    if not os.path.isfile(os.path.join(rd, "results.json")):
        if opts["collect"]:
            return "not finished"
        os.makedirs(rd, exist_ok=True)
        say(f"train {row} seed {seed}")
        t0 = time.time()
        rc = run_logged([sys.executable, "train.py", *argv], os.path.join(rd, "train.log"))
        times["train_s"] = time.time() - t0
        if rc != 0:
            return f"train.py failed (exit {rc}); see {rd}/train.log"
        if not os.path.isfile(os.path.join(rd, "results.json")):    # --slurm: submitted, not run
            return "submitted" if opts["slurm"] else "no results.json after train.py"
    say(f"eval  {row} seed {seed}")
    t0 = time.time()
    rc = run_logged([sys.executable, os.path.abspath(__file__), "_eval", rd], os.path.join(rd, "eval.log"))
    times["eval_s"] = time.time() - t0
    if rc != 0:
        return f"evaluation failed (exit {rc}); see {rd}/eval.log"
    ev = _read_json(os.path.join(rd, EVAL_FILE))
    ev.setdefault("times", {}).update(times)
    _write_json(os.path.join(rd, EVAL_FILE), ev)
    return "ok"


# ----------------------------------------------------------------------------- evaluation (subprocess)
def evaluate_run(rd):
    """`python ablation.py _eval RUN_DIR`: evaluate the run's final checkpoint."""
    import glob

    import torch

    import data as D
    import eval as E
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.time()
    ckpts = sorted(glob.glob(os.path.join(rd, "ckpt_*.pt")))
    if not ckpts:
        raise SystemExit(f"error: no ckpt_*.pt in {rd}; train the row first")
    model, tok, ck = E.load_checkpoint(ckpts[-1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    cfg = _read_json(os.path.join(rd, "config.json"))["train"]
    out = {"checkpoint": os.path.basename(ckpts[-1]), "step": ck["step"], "model_config": ck["model_config"]}
    bs = 256
    if cfg["data"] == "builtin":
        paths = E.open_builtin(cfg["data_dir"])
        out["builtin"] = E.evaluate_builtin(model, tok, paths, device, bs, probe_train=2000, progress=False)
        out["val"] = E.evaluate_retrieval(model, tok, paths["val"], paths["image_root"], bs, device, progress=False)
        if getattr(model, "predictor", None) is not None:
            out["val_train_view"] = train_view_retrieval(model, tok, paths, bs, device)
            out["val_train_view_parts"] = {   # which of the two carries the alignment?
                "predictor_only": train_view_retrieval(model, tok, paths, bs, device, batch_stats=False),
                "batch_stats_only": train_view_retrieval(model, tok, paths, bs, device, predictor=False)}
        gap_split = (paths["test"], paths["image_root"])
    elif cfg["eval_data"]:
        gap_split = (cfg["eval_data"], cfg["eval_image_root"] or cfg["image_root"])
        out["eval"] = E.evaluate_retrieval(model, tok, *gap_split, bs, device, progress=False)
    else:
        gap_split = None
    if gap_split:
        split = E.embed_retrieval_split(model, tok, *gap_split, bs, device, progress=False)
        t2i = split["text_to_image"].tolist()
        first = {}                                              # image -> its first caption
        for t, i in enumerate(t2i):
            first.setdefault(i, t)
        imgs = sorted(first)
        img_emb, txt_emb = split["image_emb"][imgs], split["text_emb"][[first[i] for i in imgs]]
        out["gap"] = {**E.modality_gap(img_emb, txt_emb, seed=0), "n_pairs": len(imgs),
                      "split": os.path.basename(gap_split[0])}
        # figure items: a seeded subset; encode_pair of the same (image, caption) pairs
        g = torch.Generator().manual_seed(0)
        pick = sorted(torch.randperm(len(imgs), generator=g)[:GAP_FIGURE_ITEMS].tolist())
        paths_sel = [split["image_paths"][imgs[j]] for j in pick]
        caps_sel = [split["captions"][first[imgs[j]]] for j in pick]
        pair, ok = E.embed_pairs(model, tok, paths_sel, caps_sel,
                                 D.ImageTransform(model.cfg.image_size, train=False), bs, device, progress=False)
        torch.save({"image": img_emb[pick], "text": txt_emb[pick], "pair": pair, "pair_ok": ok,
                    "captions": caps_sel}, os.path.join(rd, GAP_FILE))
    mpath = os.path.join(rd, "metrics.jsonl")
    if os.path.isfile(mpath):                                   # the last logged training record
        with open(mpath) as f:
            train = [r for r in map(json.loads, f) if r.get("kind") == "train"]
        if train:
            out["train_last"] = {k: train[-1][k] for k in ("step", "loss", "acc_i2t") if k in train[-1]}
    out["seconds"] = time.time() - t0
    _write_json(os.path.join(rd, EVAL_FILE), out)
    print(f"wrote {rd}/{EVAL_FILE} in {out['seconds']:.1f}s")


def train_view_retrieval(model, tok, paths, bs, device, predictor=True, batch_stats=True):
    """Val retrieval as the ITC loss sees a mocov3-head model in training: images as queries
    (student, head, predictor) against texts as keys (the evaluation encoder), with every
    BatchNorm normalising each single-modality batch by its own statistics (running stats
    set aside). High here but near chance in the normal evaluation means the predictor and
    per-modality BatchNorm carry the image-text alignment, not the shared embedding.
    predictor=False / batch_stats=False drop one of the two, to see which one carries it."""
    import types

    import torch

    import eval as E
    S = model.student
    pred = model.predictor if predictor else None
    view = types.SimpleNamespace(
        cfg=model.cfg, training=False, eval=lambda: None, train=lambda mode=True: None,
        encode_text=model.encode_text,
        encode_image=lambda x: S.project(S.encoder(image=S.encoder.embed_image(x))[:, 0], "image", pred))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] \
        if batch_stats else []
    saved = [(m.running_mean, m.running_var) for m in bns]
    for m in bns:                        # no running stats: BatchNorm uses the batch's, even in eval
        m.running_mean = m.running_var = None
    try:
        return E.evaluate_retrieval(view, tok, paths["val"], paths["image_root"], bs, device, progress=False)
    finally:
        for m, (mean, var) in zip(bns, saved):
            m.running_mean, m.running_var = mean, var


# ----------------------------------------------------------------------------- aggregation
def dig(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def flat_metrics(ev):
    """A run's ablation_eval.json -> the numbers the table shows, by column path."""
    b = ev.get("builtin", {})
    src = {"retrieval": b.get("retrieval") or {"eval": ev.get("eval")},
           "zeroshot": {**(b.get("zeroshot") or {}), **((b.get("zeroshot") or {}).get("attributes") or {})},
           "linear_probe": b.get("linear_probe"), "gap": ev.get("gap"), "val": ev.get("val"),
           "val_train_view": ev.get("val_train_view"), "val_train_view_parts": ev.get("val_train_view_parts"),
           "train": {k: 100 * v for k, v in (ev.get("train_last") or {}).items() if k == "acc_i2t"}}
    out = {}
    for path, _ in RETRIEVAL_COLS + OTHER_COLS + STUDY_COLS + \
            [(f"retrieval.eval.{k}", None) for k in ("tr1", "tr5", "ir1", "ir5")]:
        v = dig(src, path)
        if isinstance(v, (int, float)):
            out[path] = float(v)
    return out


def mean_std(xs):
    n = len(xs)
    m = sum(xs) / n
    s = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, s


def aggregate(opts):
    rows = {}
    for name, label, over in table(opts):
        if name not in opts["rows"]:
            continue
        per_seed = {}
        for s in opts["seeds"]:
            p = os.path.join(run_dir(opts, name, s), EVAL_FILE)
            if os.path.isfile(p):
                per_seed[s] = flat_metrics(_read_json(p))
        keys = sorted({k for m in per_seed.values() for k in m})
        stats = {}
        for k in keys:
            xs = [m[k] for m in per_seed.values() if k in m]
            mu, sd = mean_std(xs)
            stats[k] = {"mean": mu, "std": sd, "n": len(xs), "values": xs}
        rows[name] = {"label": label, "overrides": {**BASE, **over}, "seeds": sorted(per_seed),
                      "metrics": stats}
    return rows


def cell(stats, path, nseeds):
    st = stats.get(path)
    if not st:
        return "-"
    return f"{st['mean']:.1f}" if st["n"] < 2 else f"{st['mean']:.1f} ± {st['std']:.1f}"


def cell3(stats, path):
    st = stats.get(path)
    if not st:
        return "-"
    return f"{st['mean']:.3f}" if st["n"] < 2 else f"{st['mean']:.3f} ± {st['std']:.3f}"


def tables(rows, builtin, study=False):
    """-> list of (title, header, body rows) for the printed and markdown tables."""
    if study and builtin:
        cols = STUDY_COLS
        return [("val (selection) and test (%)", ["row", "seeds"] + [c[1] for c in cols],
                 [[r["label"], f"{len(r['seeds'])}"] + [cell(r["metrics"], p, 0) for p, _ in cols]
                  for r in rows.values()])]
    rcols = RETRIEVAL_COLS if builtin else [(f"retrieval.eval.{k}", f"eval {k.upper()[:2]}@{k[2:]}")
                                            for k in ("tr1", "tr5", "ir1", "ir5")]
    ocols = OTHER_COLS if builtin else [c for c in OTHER_COLS if c[0].startswith("gap.")]
    out = []
    for title, cols in (("retrieval (%)", rcols), ("classification (%) and modality gap", ocols)):
        body = []
        for name, r in rows.items():
            st = r["metrics"]
            cells = [cell3(st, p) if p.startswith("gap.") and "separab" not in p else cell(st, p, 0)
                     for p, _ in cols]
            body.append([r["label"], f"{len(r['seeds'])}"] + cells)
        out.append((title, ["row", "seeds"] + [c[1] for c in cols], body))
    return out


def text_table(header, body):
    w = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda r: "  ".join(str(x).ljust(n) if i == 0 else str(x).rjust(n)  # noqa: E731
                               for i, (x, n) in enumerate(zip(r, w)))
    return "\n".join([line(header), line(["-" * n for n in w])] + [line(r) for r in body])


def md_table(header, body):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in body])


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor() or "?"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_at_start": list(os.getloadavg())}


def git_commit():
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    sha = git("rev-parse", "HEAD").strip() or "?"
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return {"sha": sha, "dirty_files": dirty}


def gap_figure(opts, rows, path, per_line=4):
    """gap.png: one PCA panel per row (first seed), at most `per_line` panels per strip."""
    import tempfile

    import torch
    from PIL import Image

    import eval as E
    panels, seed = [], opts["seeds"][0]
    for name, r in rows.items():
        p = os.path.join(run_dir(opts, name, seed), GAP_FILE)
        if not os.path.isfile(p):
            continue
        g = torch.load(p, map_location="cpu", weights_only=True)
        n = g["image"].shape[0]
        xy = E.pca_2d(torch.cat([g["image"], g["text"], g["pair"]]))     # one projection for all three
        gap = _read_json(os.path.join(run_dir(opts, name, seed), EVAL_FILE)).get("gap", {})
        title = r["label"] + (f"  d {gap['centroid_distance']:.2f} sep {gap['separability']:.0f}%" if gap else "")
        panels.append((title, xy[:n], xy[n:2 * n], xy[2 * n:]))
    if not panels:
        return 0
    strips = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, len(panels), per_line):
            sp = os.path.join(tmp, f"{i}.png")
            E.draw_embedding_pca_png(panels[i:i + per_line], sp)
            with Image.open(sp) as im:
                strips.append(im.copy())
    canvas = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    y = 0
    for s in strips:
        canvas.paste(s, (0, y))
        y += s.height
    canvas.save(path)
    return len(panels)


def report(opts, argv, rows, wall, statuses, commit, mach):
    out = opts["out"]
    builtin = any("retrieval.test.tr1" in r["metrics"] for r in rows.values()) or not rows
    tabs = tables(rows, builtin, study=bool(opts.get("study")))
    cmd = shlex.join(["python", "ablation.py", *argv])
    n_fig = gap_figure(opts, rows, os.path.join(out, "gap.png"))
    seeds_note = ("mean ± sample std over seeds" if len(opts["seeds"]) > 1 else "one seed")
    stored = {}                                                 # the train.py command of each run
    for name in rows:
        for s in opts["seeds"]:
            p = os.path.join(run_dir(opts, name, s), ROW_FILE)
            if os.path.isfile(p):
                stored[f"{name}/seed{s}"] = _read_json(p)["train_argv"]
    # invocations that trained or evaluated something (a continued ablation has several;
    # one that only re-tabulates adds none): their wall times, commits and machines
    jpath = os.path.join(out, "ablation.json")
    prev = _read_json(jpath) if os.path.isfile(jpath) else {}
    invocations = prev.get("invocations")
    if invocations is None:                                     # ablation.json before this field
        invocations = [{k: prev[k] for k in ("command", "git", "machine", "wall_seconds") if k in prev}] \
            if "wall_seconds" in prev else []
    ran = sum(v == "ok" for v in statuses.values())
    if ran:
        invocations.append({"command": cmd, "git": commit, "machine": mach, "wall_seconds": wall,
                            "runs_completed": ran, "parallel": opts["parallel"]})
    total_wall = sum(i["wall_seconds"] for i in invocations)
    result = {"command": cmd, "git": commit, "machine": mach, "wall_seconds": total_wall, "seeds": opts["seeds"],
              "statuses": statuses, "rows": rows, "train_argv": stored, "invocations": invocations}
    _write_json(os.path.join(out, "ablation.json"), result)
    times = []
    for name in rows:
        for s in opts["seeds"]:
            p = os.path.join(run_dir(opts, name, s), EVAL_FILE)
            if os.path.isfile(p):
                t = _read_json(p).get("times", {})
                times.append((t.get("train_s"), t.get("eval_s")))
    tt = [t for t, _ in times if t]
    te = [e for _, e in times if e]
    chance = ""
    if builtin:
        for name in rows:
            p = os.path.join(run_dir(opts, name, opts["seeds"][0]), EVAL_FILE)
            if os.path.isfile(p):
                ev = _read_json(p)["builtin"]
                c = ev["retrieval"]["test"]["chance"]
                chance = (f"Chance: TR@1 {c['tr1']:.1f}, TR@5 {c['tr5']:.1f}, IR@1 {c['ir1']:.1f}, "
                          f"IR@5 {c['ir5']:.1f} (test); zero-shot top1 "
                          f"{ev['zeroshot']['chance_top1']:.1f} ({ev['zeroshot']['n_classes']} classes); "
                          f"probe majority class {ev['linear_probe']['chance_top1']:.1f}; separability 50.")
                break
    def dirty(c):
        return f" (uncommitted changes in: {', '.join(c['dirty_files'])})" if c.get("dirty_files") else ""
    what = f"study '{opts['study']}'" if opts.get("study") else "ablation"
    md = [f"# OneR {what} ({seeds_note}; {'val and test' if opts.get('study') else 'test'} splits; "
          "numbers in %)", ""]
    for i, inv in enumerate(invocations or [{"command": cmd, "git": commit, "machine": mach,
                                              "wall_seconds": wall}]):
        m = inv.get("machine", {})
        md += [f"Command: `{inv.get('command', '?')}`  ",
               f"Commit: `{inv.get('git', {}).get('sha', '?')}`{dirty(inv.get('git', {}))}  ",
               f"Machine: {m.get('nproc', '?')} usable cores ({m.get('cpu_count', '?')} CPUs), "
               f"{m.get('cpu_model', '?')}; load average at start "
               f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))}  ",
               f"Wall time: {inv.get('wall_seconds', 0) / 60:.1f} min with {inv.get('parallel', opts['parallel'])} "
               "single-thread runs in parallel" + (f" ({inv['runs_completed']} runs)" if "runs_completed" in inv
                                                    else ""), ""]
        md += [f"Note: {inv['note']}", ""] if inv.get("note") else []
    if len(invocations) > 1:
        md += [f"Total wall time over {len(invocations)} invocations: {total_wall / 60:.1f} min", ""]
    if tt and te:
        md += [f"Per run: train {min(tt):.0f} to {max(tt):.0f} s, evaluation {min(te):.0f} to {max(te):.0f} s "
               f"(sum over runs: {sum(tt) / 60:.1f} + {sum(te) / 60:.1f} min)", ""]
    if commit["sha"] != (invocations[-1]["git"]["sha"] if invocations and "git" in invocations[-1] else
                         commit["sha"]):
        md += [f"Tables written at commit `{commit['sha']}`{dirty(commit)}", ""]
    for title, header, body in tabs:
        md += [f"## {title}", "", md_table(header, body), ""]
    md += [chance, "",
           "Gap measures on the test split (each image and its first caption, evaluation encoder): "
           "centroid dist = distance between the image and text centroids on the unit sphere; cos matched / "
           "random = mean cosine of matched / unmatched pairs; separability = accuracy of a linear "
           "probe telling image from text embeddings (50 = one space, 100 = two islands).", "",
           f"Figure: `gap.png` ({n_fig} panels, seed {opts['seeds'][0]}): PCA-2D of image (blue), text "
           "(orange) and encode_pair (green) embeddings of up to 200 test items, matched image-text "
           "pairs joined.", "",
           "Rows (train.py overrides on top of the shared ones):", ""]
    for name, r in rows.items():
        md.append(f"- `{name}` {r['label']}: " + " ".join(f"--{k}={fmt_value(v)}" for k, v in r["overrides"].items()))
    if stored:
        # the table's first (base) row shows the shared settings; a study row's own keys replace them
        base_name, _, base_over = next((r for r in table(opts) if f"{r[0]}/seed{opts['seeds'][0]}" in stored),
                                       table(opts)[0])
        first = stored.get(f"{base_name}/seed{opts['seeds'][0]}") or next(iter(stored.values()))
        skip = tuple(f"--{k}=" for k in ROW_KEYS + tuple(base_over) + ("run_dir", "seed"))
        md += ["", "Shared (every run unless its row sets the key; plus --run_dir=OUT/ROW/seedS --seed=S): "
               "`python train.py " + " ".join(a for a in first if not a.startswith(skip)) + "`", ""]
    bad = {k: v for k, v in statuses.items() if v not in ("ok", "done")}
    if bad:
        md += ["Not finished: " + "; ".join(f"{k}: {v}" for k, v in bad.items()), ""]
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write("\n".join(md))
    print()
    for title, header, body in tabs:
        print(f"{title} ({seeds_note})\n{text_table(header, body)}\n")
    if chance:
        print(chance)
    print(f"wrote {out}/ablation.json, ablation.md" + (", gap.png" if n_fig else "") +
          f"  (wall {wall / 60:.1f} min this invocation)")


# ----------------------------------------------------------------------------- main
def main(argv):
    t0 = time.time()
    commit, mach = git_commit(), machine()                       # as the invocation starts
    opts, extras = parse_args(argv)
    shared = train_settings(opts, extras)
    order = sorted(opts["rows"], key=lambda r: -ROW_COST.get(r, 0))  # stable: table order on ties
    jobs = [(row, s, train_argv(opts, shared, row, s)) for s in opts["seeds"] for row in order]
    if opts["dry_run"]:
        for row, s, a in jobs:
            print(shlex.join(["python", "train.py", *a]))
        return 0
    # a run directory belongs to one command: refuse to continue a different one
    # (--collect only evaluates what is there, so it needs no matching command)
    for row, s, a in ([] if opts["collect"] else jobs):
        rd = run_dir(opts, row, s)
        p = os.path.join(rd, ROW_FILE)
        if os.path.isfile(p) and _read_json(p)["train_argv"] != a:
            raise SystemExit(f"error: {rd} was trained with other settings:\n  {_read_json(p)['train_argv']}\n"
                             f"now:\n  {a}\nchoose another --out or delete {rd}")
    os.makedirs(opts["out"], exist_ok=True)
    for row, s, a in ([] if opts["collect"] else jobs):
        os.makedirs(run_dir(opts, row, s), exist_ok=True)
        _write_json(os.path.join(run_dir(opts, row, s), ROW_FILE), {"row": row, "seed": s, "train_argv": a})
    bd = builtin_data(opts, shared)
    if bd and not opts["collect"]:
        import data as D                                        # make the set once, not in every run
        D.ensure_synth(bd[0] if os.path.isabs(bd[0]) else os.path.join(ROOT, bd[0]), n_images=bd[1])
    lock = threading.Lock()

    def say(msg):
        with lock:
            print(f"[{time.strftime('%H:%M:%S')} +{(time.time() - t0) / 60:5.1f} min] {msg}", flush=True)

    say(f"{len(jobs)} runs ({len(opts['rows'])} rows x {len(opts['seeds'])} seeds), {opts['parallel']} at a time, "
        f"out {opts['out']}")
    statuses = {}
    with ThreadPoolExecutor(opts["parallel"]) as pool:
        futs = {pool.submit(job, opts, row, s, a, say): (row, s) for row, s, a in jobs}
        for f, (row, s) in futs.items():
            try:
                st = f.result()
            except Exception as e:                              # report, keep the others going
                st = f"error: {e!r}"
            statuses[f"{row}/seed{s}"] = st
            say(f"{row} seed {s}: {st}")
    rows = aggregate(opts)
    report(opts, argv, rows, time.time() - t0, statuses, commit, mach)
    failed = [k for k, v in statuses.items() if v not in ("ok", "done", "submitted", "not finished")]
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_eval":
        if len(sys.argv) != 3:
            raise SystemExit("usage: python ablation.py _eval RUN_DIR")
        evaluate_run(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))
