"""Train OneR: one process, torchrun, or submitit on SLURM; same main(cfg) everywhere.

    python train.py                                 # demo on the built-in set, ~10 min on 2 CPU cores
    python train.py --preset cc3m --data cc3m.json --image_root /data/cc3m
    torchrun --nproc_per_node 8 train.py --preset cc3m ...
    python train.py --preset oner4m --slurm --nodes 4 --gpus_per_node 8 --partition gpu ...
    python train.py --bench --model B/16 --batch_size 256    # speed, FLOPs, MFU (no data)

Overrides are --key=value (or --key value, or --flag for booleans) over any field of
TrainConfig below or of oner.OneRConfig; an unknown key or a bad value stops before
anything starts. A run directory is always resumed from its latest complete checkpoint.
Test hooks (environment): ONER_FAIL_IN_CHECKPOINT=STEP kills the process in the middle
of writing that step's checkpoint; ONER_INJECT_NAN=STEP[:RANK] makes that step's loss NaN;
ONER_PAUSE_AT_STEP=STEP makes a run that did not resume wait after that step (its
checkpoint written) until it is signalled or killed, like a job still running at its
time limit (tests/test_distributed.py uses it for the submitit requeue test).

Distributed: torchrun or submitit export RANK/WORLD_SIZE/LOCAL_RANK (+ MASTER_ADDR/PORT);
DDP averages gradients, oner.py gathers contrastive keys over ranks and normalises
MLM/MIM by the global masked count, so the step equals one process on the global batch
(tests/test_distributed.py). --accum_steps: see forward_backward. --requeue_signal=USR1:
on that signal every rank stops at the next step boundary, saves, and exits with code
REQUEUE_EXIT (slurm/oner.sbatch then requeues the job).
"""
import dataclasses
import difflib
import glob
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

import data as D
import eval as E
from oner import OneR, OneRConfig


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    preset: str = "demo"
    model: str = "mu"              # size name for OneRConfig.from_name; model fields override it
    run_dir: str = ""              # default runs/<preset>
    # data
    data: str = "builtin"          # "builtin" | train.json (+ image_root) | "shards/{00000..00099}.tar"
    image_root: str = ""
    eval_data: str = ""            # JSON split for periodic validation and the final evaluation
    eval_image_root: str = ""      # default: image_root
    data_dir: str = "data/builtin"  # where the built-in set is made if absent
    synth_images: int = 10000
    tokenizer: str = "gpt2"        # builtin data uses its own small BPE
    shard_samples: int = 0         # samples per epoch for tar shards (required with shards)
    image_mask_ratio: float = 0.2  # [choice] share of patches masked (MIM), exact per image; best on val
    image_mask_mode: str = "random"  # [choice] "random" | "block"
    text_mask_prob: float = 0.15   # whole-word MLM masking
    crop: bool = True              # random resized crop (scale crop_min..1); off for builtin
    crop_min: float = 0.5
    flip: bool = False
    workers: int = 0
    # schedule
    steps: int = 0                 # total optimiser steps; 0 -> epochs * steps per epoch
    epochs: float = 0.0
    batch_size: int = 128          # global, over all ranks
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    beta2: float = 0.98
    grad_clip: float = 1.0
    momentum_schedule: str = "cosine"  # key-encoder m: "cosine" (m -> 1, MoCo v3) | "constant"
    max_skips: int = 5             # abort after this many consecutive non-finite steps
    accum_steps: int = 1           # micro-batches per optimiser step (see forward_backward)
    seed: int = 0
    # system
    device: str = "auto"
    precision: str = "auto"        # "bf16" | "fp32" | "auto" (bf16 on GPU, fp32 on CPU)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" checks graphs fast
    grad_ckpt: bool = False        # activation checkpointing for small-memory GPUs
    requeue_signal: str = ""       # e.g. USR1: save at the next step and exit REQUEUE_EXIT
    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 0            # steps; 0 = only at the end
    best_metric: str = "mean"      # retrieval key used to keep best.pt
    eval_batch: int = 256
    save_every: int = 0            # steps; 0 = only at the end (and every save_minutes)
    save_minutes: float = 10.0
    keep: int = 2                  # step checkpoints kept
    init_from: str = ""            # start from a checkpoint's weights (fine-tuning)
    # benchmark mode (no data loading): python train.py --bench
    bench: bool = False
    bench_steps: int = 10
    bench_loader: bool = True      # also measure the data loader (decode + transform)
    # launch on SLURM through submitit: python train.py --slurm ...
    slurm: bool = False
    cluster: str = "slurm"         # submitit executor: "slurm" | "local" | "debug"
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 10
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: float = 4320         # job time limit in minutes (whole minutes on SLURM)
    mem_gb: int = 0
    signal_delay_s: int = 120      # SIGUSR2 this long before the time limit -> requeue


PRESETS = {
    # ~0.75 s steps on 2 CPU cores (clean queries cost 1.7x the FLOPs of masked ones, so 700
    # steps cost what 1000 masked-query steps did); trains and evaluates in about 10 minutes.
    # lr 2e-3 and m = 0 learn fastest at this budget (README, "Choices settled on val")
    "demo": dict(model="mu", width=128, depth=4, heads=4, patch_size=8, image_size=32,
                 embed_dim=128, max_text_len=24, data="builtin", crop=False,
                 steps=700, batch_size=128, lr=2e-3, momentum=0.0, warmup_steps=50,
                 eval_every=250, log_every=50, save_every=250),
    # the SLIP / OneR ablation protocol: ViT-B/16, CC3M, 40 epochs, global batch 4096
    # (~2.9M pairs: ~710 steps per epoch, so 1400 warm-up steps are ~2 epochs)
    "cc3m": dict(model="B/16", epochs=40, batch_size=4096, lr=5e-4, weight_decay=0.5,
                 warmup_steps=1400, min_lr=1e-6, workers=10, save_every=1000,
                 log_every=50, eval_every=5000, max_text_len=32, momentum=0.99),
    # the paper's run: 4M pairs (COCO+VG+SBU+CC3M, 5.1M captions), 32 GPUs
    "oner4m": dict(model="B/16", epochs=30, batch_size=4096, lr=5e-4, weight_decay=0.2,
                   warmup_steps=2000, min_lr=1e-6, workers=10, save_every=1000,
                   log_every=50, eval_every=5000, max_text_len=32, momentum=0.99),
}

SIZE_KEYS = {"width", "depth", "heads", "mlp_ratio", "patch_size", "image_size", "embed_dim",
             "max_text_len", "vocab_size"}
TRAIN_KEYS = {f.name: f for f in fields(TrainConfig)}
MODEL_KEYS = {f.name: f for f in fields(OneRConfig)}
assert not set(TRAIN_KEYS) & set(MODEL_KEYS), "train and model config keys must differ"


def coerce(key, value, ftype):
    """'--key=value' string -> the field's type, or a message naming key and type."""
    if not isinstance(value, str):
        return value
    try:
        if ftype in (bool, "bool"):
            v = value.lower()
            if v not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return v in ("1", "true", "yes", "on")
        return {"int": int, "float": float, "str": str}.get(getattr(ftype, "__name__", ftype), str)(value)
    except ValueError:
        name = getattr(ftype, "__name__", ftype)
        raise SystemExit(f"error: --{key}={value!r}: expected a {name}") from None


def parse_overrides(argv):
    """['--a=1', '--b', '2', '--flag'] -> {'a': '1', 'b': '2', 'flag': 'true'}"""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; use --key=value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                val, i = nxt, i + 1
            else:
                val = "true"
        out[key.replace("-", "_")] = val
        i += 1
    return out


def resolve(argv):
    """CLI -> (TrainConfig, OneRConfig): preset, then overrides; every key is checked."""
    cli = parse_overrides(argv)
    preset = cli.get("preset", "demo")
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset={preset!r}: choose one of {sorted(PRESETS)}")
    base = dict(PRESETS[preset])
    if "model" in cli:  # a named size replaces the preset's whole architecture
        base = {k: v for k, v in base.items() if k not in SIZE_KEYS}
    merged = {**base, **cli, "preset": preset}
    train, model = {}, {}
    for key, value in merged.items():
        if key in TRAIN_KEYS:
            train[key] = coerce(key, value, TRAIN_KEYS[key].type)
        elif key in MODEL_KEYS:
            model[key] = coerce(key, value, MODEL_KEYS[key].type)
        else:
            near = difflib.get_close_matches(key, list(TRAIN_KEYS) + list(MODEL_KEYS), n=3)
            hint = f" (did you mean {', '.join('--' + n for n in near)}?)" if near else ""
            raise SystemExit(f"error: unknown config key --{key}{hint}")
    tc = TrainConfig(**train)
    tc.run_dir = tc.run_dir or os.path.join("runs", tc.preset)
    try:
        mc = OneRConfig.from_name(tc.model, **model).validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for key, ok in dict(precision=("auto", "bf16", "fp32"), image_mask_mode=("random", "block"),
                        momentum_schedule=("cosine", "constant"),
                        cluster=("slurm", "local", "debug")).items():
        if getattr(tc, key) not in ok:
            raise SystemExit(f"error: --{key}={getattr(tc, key)!r}: expected one of {ok}")
    if tc.batch_size < 1 or tc.steps < 0 or tc.epochs < 0:
        raise SystemExit("error: --batch_size must be >= 1 and --steps/--epochs >= 0")
    if tc.accum_steps < 1:
        raise SystemExit(f"error: --accum_steps={tc.accum_steps}: expected an int >= 1")
    if tc.requeue_signal and not isinstance(getattr(signal, signal_name(tc.requeue_signal), None),
                                            signal.Signals):
        raise SystemExit(f"error: --requeue_signal={tc.requeue_signal!r}: expected a signal name "
                         "such as USR1")
    return tc, mc


# ----------------------------------------------------------------------------- distributed
def setup_distributed(tc):
    """torchrun / submitit export RANK, WORLD_SIZE, LOCAL_RANK; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if tc.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_agree(flag, device):
    """True on every rank iff True on all ranks: one collective, same decision everywhere."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = flag.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t[0] > 0
    return flag


def step_decisions(finite, stop, device):
    """The two decisions every rank must take alike at a step boundary, in one all_reduce
    (the step's one host sync): (every rank's loss and grad norm are finite -> step,
    some rank got the requeue signal -> save and exit). A rank never leaves alone."""
    t = torch.stack([finite.to(device=device, dtype=torch.float32).reshape(()),
                     torch.tensor(0.0 if stop else 1.0, device=device)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    ok, go_on = t.tolist()
    return ok > 0, go_on <= 0


def signal_name(name):  # "usr1" | "SIGUSR1" -> "SIGUSR1"
    name = name.upper()
    return name if name.startswith("SIG") else "SIG" + name


REQUEUE_EXIT = 3  # exit code after a --requeue_signal save; slurm/oner.sbatch requeues on it


def micro_batches(batch, n):
    """Split a local batch into n equal micro-batches: rows [i*B/n, (i+1)*B/n) of every
    per-pair tensor; per-batch scalars (collate's "bad" count) go to the first only."""
    if n == 1:
        return [batch]
    parts = {k: v.chunk(n) if v.ndim else [v] + [torch.zeros_like(v)] * (n - 1)
             for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def forward_backward(fwd, model, batch, accum_steps, device, prec, poison=False):
    """Forward and backward of one optimiser step. Returns (outputs detached and averaged
    over micro-batches, the loss the finite check sees).

    Gradient accumulation [decision]: each of the accum_steps micro-batches is its own
    contrastive problem. Its negatives are the keys of that micro-batch on every rank (a
    global micro-batch of batch_size / accum_steps pairs) and its MLM/MIM terms are
    normalised by that micro-batch's global masked count; the step's gradient is the sum
    of the micro-batch gradients / accum_steps. No feature cache: accumulation saves
    memory but does not enlarge the contrastive batch, so accum_steps=k trains the
    objective of batch_size / k with k times less gradient noise, not the objective of
    batch_size (prefer more GPUs or --grad_ckpt when the batch size matters). DDP
    all-reduces once, in the last micro-batch's backward (no_sync before it); the finite
    check runs once per step on the result. The data order and checkpoints do not depend
    on accum_steps, so exact resume is unaffected."""
    from contextlib import nullcontext
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    out_avg, seen = {}, None
    micro = micro_batches(batch, accum_steps)
    for i, mb in enumerate(micro):
        hold = ddp and i < len(micro) - 1  # accumulate locally, all-reduce on the last
        with model.no_sync() if hold else nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                out = fwd(mb)
            loss = out["loss"]
            if poison:  # test hook ONER_INJECT_NAN
                loss = loss * float("nan")
            (loss / accum_steps if accum_steps > 1 else loss).backward()
        for k, v in out.items():
            v = v.detach() / accum_steps if accum_steps > 1 else v.detach()
            out_avg[k] = v if k not in out_avg else out_avg[k] + v
        seen = loss.detach() if seen is None else seen + loss.detach()
    return out_avg, seen


# ----------------------------------------------------------------------------- checkpoints
def ckpt_paths(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")))


def atomic_save(obj, path, fail_hook=False):
    """Write to a temporary name, fsync, then os.replace: a crash never leaves a file
    under the final name, and ckpt_*.pt only ever names complete checkpoints."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        if fail_hook:  # test hook: die half-way through a write, like a SIGKILL would
            f.flush()
            f.truncate(f.tell() // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_latest(run_dir):
    """Latest checkpoint that loads; a damaged one is reported and the previous used."""
    for path in reversed(ckpt_paths(run_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back
            print(f"warning: skipping unreadable checkpoint {path}: {e}", file=sys.stderr)
    return None, None


def rng_state():
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- schedules
def lr_at(step, tc, total):
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    t = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    return tc.min_lr + (tc.lr - tc.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def momentum_at(step, m, tc, total):  # MoCo v3: m rises to 1 on a half cosine
    if tc.momentum_schedule == "constant" or m == 0:
        return m
    return 1 - (1 - m) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def make_optimizer(model, tc, device):
    """AdamW; no weight decay on norms, biases, embeddings, position tables, [CLS]/[MASK]
    and temperatures (all of them either 1-D or named here)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "tok_embed" in name or "pos_" in name or "log_scale" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, tc.beta2),
                             fused=device.type == "cuda")


# ----------------------------------------------------------------------------- data
def build_data(tc, mc, rank, world, tokenizer=None):
    """-> (train dataset, tokenizer, validation split or None, final test splits dict)."""
    if tc.data == "builtin":
        paths = D.ensure_synth(tc.data_dir, n_images=tc.synth_images)
        tokenizer = tokenizer or D.load_tokenizer(paths["tokenizer"])
        train_json, root = paths["train"], paths["image_root"]
        val = (paths["val"], root)
        tests = {"test": (paths["test"], root), "test_comp": (paths["test_comp"], root)}
    else:
        tokenizer = tokenizer or D.load_tokenizer(tc.tokenizer)
        train_json, root = tc.data, tc.image_root
        val = (tc.eval_data, tc.eval_image_root or tc.image_root) if tc.eval_data else None
        tests = {"eval": val} if val else {}
    return tokenizer, train_json, root, val, tests


def make_dataset(tc, mc, tokenizer, train_json, root, rank, world):
    masker = D.Masker(mc.num_patches, image_ratio=tc.image_mask_ratio if mc.mim > 0 else 0.0,
                      image_mode=tc.image_mask_mode,
                      text_prob=tc.text_mask_prob if mc.mlm > 0 else 0.0,
                      vocab_size=tokenizer.vocab_size, word_starts=tokenizer.word_starts(),
                      max_predictions=mc.mlm_slots)
    builtin = tc.data == "builtin"
    transform = D.ImageTransform(mc.image_size, train=True, crop=tc.crop and not builtin,
                                 crop_scale=(tc.crop_min, 1.0), flip=tc.flip and not builtin)
    if ".tar" in train_json:
        if tc.shard_samples <= 0:
            raise SystemExit("error: tar shards need --shard_samples=N (samples per epoch)")
        return D.ShardDataset(train_json, tokenizer, mc.max_text_len, transform, masker,
                              seed=tc.seed, rank=rank, world_size=world,
                              epoch_samples=tc.shard_samples)
    if not os.path.isfile(train_json):
        raise SystemExit(f"error: training annotations {train_json!r} not found; expected an "
                         "ALBEF/BLIP JSON list of {\"image\", \"caption\"} (or --data=builtin)")
    return D.PairDataset(train_json, root, tokenizer, mc.max_text_len, transform, masker,
                         seed=tc.seed, in_memory=builtin, one_caption_per_image=builtin)


# ----------------------------------------------------------------------------- logging
class Logger:
    """Human line + metrics.jsonl, rank 0 only."""

    def __init__(self, run_dir, rank):
        self.rank, self.path = rank, os.path.join(run_dir, "metrics.jsonl")

    def __call__(self, msg="", **record):
        if self.rank != 0:
            return
        if msg:
            print(msg, flush=True)
        if record:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def run_header(tc, mc, world, device, n_params, tokenizer):
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        sha = "?"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return "\n".join([
        f"OneR  git {sha or '?'}  torch {torch.__version__}  python {platform.python_version()}",
        f"device {device} ({name}) x {world}  precision {precision(tc, device)}  compile {tc.compile}"
        f"  threads {torch.get_num_threads()}",
        f"model {tc.model}: width {mc.width} depth {mc.depth} heads {mc.heads} patch {mc.patch_size} "
        f"image {mc.image_size} text {mc.max_text_len} vocab {mc.vocab_size} ({tokenizer.name})  "
        f"params {n_params / 1e6:.2f}M  losses {'+'.join(mc.active)}",
        f"global batch {tc.batch_size} ({tc.batch_size // world}/rank)  lr {tc.lr}  run_dir {tc.run_dir}",
    ])


def precision(tc, device):
    if tc.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return tc.precision


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, splits, tc, device):
    """Zero-shot retrieval on each (json, image_root) split -> {split: metrics}."""
    was_training = model.training
    model.eval()
    out = {name: E.evaluate_retrieval(model, tokenizer, js, root, batch_size=tc.eval_batch,
                                      device=device) for name, (js, root) in splits.items()}
    model.train(was_training)
    return out


def results_table(results):
    keys = ["tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean"]
    lines = [f"{'split':<10}" + "".join(f"{k.upper():>7}" for k in keys) + "   images captions"]
    for name, r in results.items():
        lines.append(f"{name:<10}" + "".join(f"{r[k]:7.1f}" for k in keys)
                     + f"   {r.get('n_images', '?'):>6} {r.get('n_texts', '?'):>8}")
    return "\n".join(lines)


def plot_png(history, table, path):
    """Loss curves (one line per term, each scaled to its own range) and the results
    table, drawn with Pillow so no plotting library is needed."""
    from PIL import Image, ImageDraw
    W, H, pad = 720, 480, 50
    img = Image.new("RGB", (W, H + 16 * (table.count("\n") + 3)), "white")
    d = ImageDraw.Draw(img)
    terms = [k for k in history[0] if k not in ("step",)] if history else []
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    steps = [h["step"] for h in history]
    x0, x1, y0, y1 = pad, W - 20, 30, H - pad
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text((x0, 8), "training losses (each term scaled to its own min..max)", fill="black")
    for i, t in enumerate(terms):
        ys = [h[t] for h in history if t in h]
        if len(ys) < 2:
            continue
        lo, hi = min(ys), max(ys)
        pts = [(x0 + (x1 - x0) * (s - steps[0]) / max(1, steps[-1] - steps[0]),
                y1 - (y1 - y0) * (v - lo) / max(1e-9, hi - lo)) for s, v in zip(steps, ys)]
        c = colours[i % len(colours)]
        d.line(pts, fill=c, width=2)
        d.text((x1 - 170, y0 + 6 + 14 * i), f"{t}: {ys[0]:.3f} -> {ys[-1]:.3f}", fill=c)
    d.text((x0, y1 + 6), f"step {steps[0] if steps else 0}", fill="black")
    d.text((x1 - 80, y1 + 6), f"step {steps[-1] if steps else 0}", fill="black")
    d.text((x0, H + 4), "zero-shot retrieval (%)", fill="black")
    for r, line in enumerate(table.splitlines()):  # one cell per column: fonts are proportional
        for c, cell in enumerate(line.split()):
            d.text((x0 + (0 if c == 0 else 40 + 52 * c), H + 20 + 16 * r), cell, fill="black")
    img.save(path)


# ----------------------------------------------------------------------------- model setup
def build_model(tc, mc, tokenizer, ck, log):
    """Resume (ck) > --init_from > fresh. Fine-tuning keeps the checkpoint's architecture
    and tokenizer; the loss terms, momentum and image size come from this run's config.
    The tower (encoder + heads) loads strictly; term-specific heads load when both have them."""
    if ck is not None:
        model = OneR(OneRConfig(**ck["model_config"]))
        model.load_state_dict(ck["model"], strict=True)
        return model, tokenizer
    if tc.init_from:
        old, tokenizer, _ = E.load_checkpoint(tc.init_from, image_size=mc.image_size)
        arch = ("width", "depth", "heads", "mlp_ratio", "patch_size", "embed_dim", "vocab_size",
                "max_text_len", "head_type", "two_heads")
        mc = dataclasses.replace(mc, **{k: getattr(old.cfg, k) for k in arch})
        model = OneR(mc)
        load_tower(model.student, old.student.state_dict())
        if model.key is not None:
            load_tower(model.key, (old.key or old.student).state_dict())
        for name in ("mlm_head", "mim_head"):
            if hasattr(model, name) and hasattr(old, name):
                getattr(model, name).load_state_dict(getattr(old, name).state_dict(), strict=True)
        log(f"initialised from {tc.init_from} (image size {old.cfg.image_size} -> {mc.image_size})")
        return model, tokenizer
    mc = dataclasses.replace(mc, vocab_size=tokenizer.vocab_size)
    return OneR(mc), tokenizer


def load_tower(tower, state):
    """Strict load of a Tower, except [MASK], which oner.py builds only with MLM or MIM:
    dropped when this run has neither, kept as initialised when the checkpoint had none."""
    state = dict(state)
    if tower.encoder.mask_token is None:
        state.pop("encoder.mask_token", None)
    elif "encoder.mask_token" not in state:
        state["encoder.mask_token"] = tower.encoder.mask_token.detach().clone()
    tower.load_state_dict(state, strict=True)


def save_checkpoint(path, raw, opt, step, tc, tokenizer, counters, best, fail_hook=False):
    atomic_save({"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "train_config": dataclasses.asdict(tc), "model_config": raw.cfg.to_dict(),
                 "tokenizer": tokenizer.identity(), "rng": rng_state(), "counters": counters,
                 "best": best, "world_size": dist.get_world_size() if dist.is_initialized() else 1},
                path, fail_hook)


def env_hook(name):
    """ONER_FAIL_IN_CHECKPOINT=12 -> (12, None); ONER_INJECT_NAN=7:1 -> (7, 1)."""
    v = os.environ.get(name, "")
    if not v:
        return None, None
    step, _, rank = v.partition(":")
    return int(step), (int(rank) if rank else None)


# ----------------------------------------------------------------------------- main
def main(tc, mc):
    rank, world, device = setup_distributed(tc)
    if tc.bench:
        return bench(tc, mc, device)
    if tc.batch_size % (world * tc.accum_steps):
        raise SystemExit(f"error: --batch_size={tc.batch_size} must divide by the world size "
                         f"{world} x --accum_steps {tc.accum_steps}")
    os.makedirs(tc.run_dir, exist_ok=True)
    log = Logger(tc.run_dir, rank)
    torch.manual_seed(tc.seed)

    ck, ck_path = load_latest(tc.run_dir)
    tokenizer = D.Tokenizer.from_identity(ck["tokenizer"]) if ck else None
    if ck is None and tc.init_from:
        tokenizer = E.load_checkpoint(tc.init_from)[1]
    tokenizer, train_json, root, val_split, test_splits = build_data(tc, mc, rank, world, tokenizer)
    raw, tokenizer = build_model(tc, mc, tokenizer, ck, log)
    mc = raw.cfg
    raw.student.encoder.grad_ckpt = tc.grad_ckpt
    raw.to(device)
    opt = make_optimizer(raw, tc, device)
    step, counters, best = 0, {"skipped": 0, "bad": 0}, None
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])
        step, counters, best = ck["step"], ck["counters"], ck["best"]
        set_rng_state(ck["rng"])
        if ck["world_size"] != world:
            log(f"warning: resuming a {ck['world_size']}-process run on {world} processes: the "
                "data order continues from the same position but is no longer bitwise identical")
        log(f"resumed from {ck_path} at step {step}")

    ds = make_dataset(tc, mc, tokenizer, train_json, root, rank, world)
    local_batch = tc.batch_size // world
    steps_per_epoch = max(1, len(ds) // tc.batch_size)
    total = tc.steps or math.ceil(tc.epochs * steps_per_epoch)
    if total <= 0:
        raise SystemExit("error: set --steps or --epochs")
    sampler = D.ResumableSampler(len(ds), tc.batch_size, rank, world, seed=tc.seed, start_step=step)
    loader = D.make_loader(ds, sampler, local_batch, tc.workers)

    model = raw
    if world > 1 and device.type == "cuda":  # MoCo v3 head: BatchNorm over the global batch
        model = raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    elif world > 1 and mc.head_type == "mocov3":
        log("warning: SyncBatchNorm needs CUDA; the mocov3 head's BatchNorm uses per-rank statistics")
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    # fixed shapes (drop_last, fixed text length, fixed-k MLM slots): one graph, no recompiles
    fwd = torch.compile(model, backend=tc.compile_backend) if tc.compile else model
    prec = precision(tc, device)
    n_params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    if ck is None and rank == 0:
        with open(os.path.join(tc.run_dir, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(tc), "model": mc.to_dict(),
                       "tokenizer": tokenizer.name}, f, indent=2)
    log(run_header(tc, mc, world, device, n_params, tokenizer))
    log(f"{len(ds)} training pairs, {steps_per_epoch} steps/epoch, {total} steps "
        f"({total / steps_per_epoch:.2f} epochs)")

    fail_step, _ = env_hook("ONER_FAIL_IN_CHECKPOINT")
    nan_step, nan_rank = env_hook("ONER_INJECT_NAN")
    pause_step, _ = env_hook("ONER_PAUSE_AT_STEP")
    stop_requested = []  # set by --requeue_signal's handler, acted on at a step boundary
    if tc.requeue_signal:
        signal.signal(getattr(signal, signal_name(tc.requeue_signal)),
                      lambda *_: stop_requested.append(True))
    graphs = None  # torch.compile: graphs after the warm-up steps, to count recompiles
    params = [p for p in raw.parameters() if p.requires_grad]
    sums, n_acc, n_ok, n_bad, t_data, t_step = {}, 0, 0, 0, 0.0, 0.0
    consecutive, last_save, t_start, start_step = 0, time.time(), time.time(), step
    it = iter(loader)
    raw.train()
    while step < total:
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(it).items()}
        t1 = time.perf_counter()
        lr = lr_at(step, tc, total)
        for g in opt.param_groups:
            g["lr"] = lr
        poison = step == nan_step and nan_rank in (None, rank)  # test hook
        out, loss = forward_backward(fwd, model, batch, tc.accum_steps, device, prec, poison)
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        # the one host synchronisation of a step: every rank takes the same decisions
        ok, stop = step_decisions(torch.isfinite(loss) & torch.isfinite(gnorm),
                                  bool(stop_requested), device)
        if ok:
            opt.step()
            raw.update_key_encoder(momentum_at(step, mc.momentum, tc, total))
            consecutive = 0
        else:
            counters["skipped"] += 1
            consecutive += 1
            msg = (f"step {step}: non-finite loss or gradient norm, step skipped "
                   f"({consecutive} in a row, {counters['skipped']} in all)")
            log(msg)
            if rank:  # every rank says so: the decision is shared, not rank 0's alone
                print(f"[rank {rank}] {msg}", flush=True)
            if consecutive >= tc.max_skips:  # all ranks reach this at the same step
                raise SystemExit(
                    f"{f'[rank {rank}] ' if world > 1 else ''}"
                    f"error: {consecutive} consecutive non-finite steps (last at step {step}); "
                    "stopping. The last checkpoint is intact: lower --lr, raise --warmup_steps, "
                    "try --precision=fp32, or inspect the data.")
        opt.zero_grad(set_to_none=True)
        step += 1
        if tc.compile and step == start_step + 2:  # warm-up over: later graphs are recompiles
            from torch._dynamo.utils import counters as dynamo_counters
            graphs = dynamo_counters["stats"]["unique_graphs"]
        # accumulate log values as tensors: no host sync on steps that do not log
        if ok:  # a skipped step's values are NaN: leave them out of the averages
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            sums["grad_norm"] = sums.get("grad_norm", 0) + gnorm.detach().float()
            n_ok += 1
        n_bad = n_bad + batch["bad"].sum()
        n_acc += 1
        t2 = time.perf_counter()
        t_data, t_step = t_data + (t1 - t0), t_step + (t2 - t0)

        if step % tc.log_every == 0 or step == total:
            keys = sorted(sums)
            vals = torch.stack([sums[k].reshape(()) / max(1, n_ok) for k in keys]
                               + [n_bad.float().reshape(())])
            if world > 1:  # every rank's mean; bad samples are summed, not averaged
                dist.all_reduce(vals)
                vals[:-1] /= world
            *vals, bad = vals.tolist()
            vals = dict(zip(keys, vals))
            counters["bad"] += int(bad)
            rate = n_acc * tc.batch_size / t_step
            eta = (time.time() - t_start) / max(1, step - start_step) * (total - step)
            terms = "  ".join(f"{k} {vals[k]:.4f}" for k in mc.active if k in vals)
            scales = " ".join(f"{k[6:]} {vals[k]:.1f}" for k in keys if k.startswith("scale_"))
            log(f"step {step}/{total}  loss {vals.get('loss', float('nan')):.4f}  {terms}  "
                f"lr {lr:.2e}  scale {scales}  acc {100 * vals.get('acc_i2t', 0):.1f}%  "
                f"gnorm {vals.get('grad_norm', float('nan')):.2f}  data {1e3 * t_data / n_acc:.0f}ms/"
                f"step {1e3 * t_step / n_acc:.0f}ms  {rate:.0f} pairs/s  ETA {fmt_time(eta)}",
                kind="train", step=step, lr=lr, pairs_per_s=rate, data_ms=1e3 * t_data / n_acc,
                step_ms=1e3 * t_step / n_acc, skipped=counters["skipped"], bad=counters["bad"],
                **vals)
            sums, n_acc, n_ok, n_bad, t_data, t_step = {}, 0, 0, 0, 0.0, 0.0

        if tc.eval_every and (step % tc.eval_every == 0 or step == total) and val_split:
            if rank == 0:
                r = evaluate(raw, tokenizer, {"val": val_split}, tc, device)["val"]
                log(f"step {step}: val " + " ".join(f"{k} {r[k]:.1f}" for k in
                    ("tr1", "tr5", "ir1", "ir5", "mean")), kind="val", step=step, **r)
                if best is None or r[tc.best_metric] > best:
                    best = r[tc.best_metric]
                    save_checkpoint(os.path.join(tc.run_dir, "best.pt"), raw, opt, step, tc,
                                    tokenizer, counters, best)
            if world > 1:
                dist.barrier()

        due = (tc.save_every and step % tc.save_every == 0) or step == total or \
            time.time() - last_save > 60 * tc.save_minutes or stop
        if due and rank == 0:
            path = os.path.join(tc.run_dir, f"ckpt_{step:08d}.pt")
            save_checkpoint(path, raw, opt, step, tc, tokenizer, counters, best,
                            fail_hook=step == fail_step)
            for old in ckpt_paths(tc.run_dir)[:-tc.keep]:
                os.remove(old)
        if due:
            last_save = time.time()
        if stop:  # --requeue_signal: every rank saw it in the same all_reduce
            log(f"step {step}: got {signal_name(tc.requeue_signal)}: checkpoint saved, exiting "
                f"with code {REQUEUE_EXIT} to be requeued", kind="requeue", step=step)
            if world > 1:
                dist.barrier()  # rank 0's checkpoint is complete before anyone leaves
                dist.destroy_process_group()
            sys.exit(REQUEUE_EXIT)
        if step == pause_step and start_step == 0:  # test hook, see the module docstring
            log(f"step {step}: ONER_PAUSE_AT_STEP: waiting to be signalled or killed")
            if world > 1 and rank:
                dist.barrier()  # fails (or never returns) once rank 0 is gone
            while True:
                time.sleep(0.5)

    if graphs is not None:
        n = dynamo_counters["stats"]["unique_graphs"] - graphs
        log(f"torch.compile: {graphs} graph(s) in the first 2 steps, {n} recompile(s) after",
            kind="compile", warmup_graphs=graphs, recompiles=n)
    finish(raw, tokenizer, tc, test_splits, rank, world, device, log, counters, t_start)


def finish(raw, tokenizer, tc, test_splits, rank, world, device, log, counters, t_start):
    """Final evaluation, results.json, summary.txt and curves.png (rank 0)."""
    if rank == 0:
        results = evaluate(raw, tokenizer, test_splits, tc, device) if test_splits else {}
        table = results_table(results) if results else "(no evaluation split)"
        with open(os.path.join(tc.run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        log("zero-shot retrieval (%):\n" + table, kind="test", **{
            f"{s}_{k}": v for s, r in results.items() for k, v in r.items()})
        history = {}
        with open(os.path.join(tc.run_dir, "metrics.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "train":  # a resumed run repeats steps: keep the last
                    history[r["step"]] = {"step": r["step"], **{t: r[t] for t in raw.cfg.active if t in r}}
        hist = [history[s] for s in sorted(history)]
        plot_png(hist, table, os.path.join(tc.run_dir, "curves.png"))
        last = ckpt_paths(tc.run_dir)[-1] if ckpt_paths(tc.run_dir) else "(none)"
        summary = (f"OneR run {tc.run_dir}\nfinal checkpoint: {last}\n"
                   f"skipped steps: {counters['skipped']}  bad samples: {counters['bad']}\n"
                   f"wall time this process: {fmt_time(time.time() - t_start)}\n\n"
                   f"zero-shot retrieval (%):\n{table}\n")
        with open(os.path.join(tc.run_dir, "summary.txt"), "w") as f:
            f.write(summary)
        log(f"wrote {tc.run_dir}/summary.txt, results.json, curves.png")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- benchmark
PEAK_BF16_TFLOPS = {"A100": 312, "H100": 989, "H200": 989, "A10": 125, "L4": 121, "V100": 125}


def pass_tokens(mc):
    """Sequence length of every pass the OneR step runs: {name: (tokens, with_grad)}."""
    on = lambda t: getattr(mc, t) > 0  # noqa: E731
    P, L, masked = mc.num_patches, mc.max_text_len, on("mlm") or on("mim")
    clean, passes = mc.query_view == "clean", {}
    if (on("itc") or on("xmc") or masked) and (masked or not clean):
        passes.update(student_image=(1 + P, True), student_text=(1 + L, True))
    if clean and (on("itc") or on("xmc")):
        passes.update(clean_image=(1 + P, True), clean_text=(1 + L, True))
    if on("cmc") or masked:
        if masked or not clean:
            passes["student_joint"] = (1 + P + L, True)
        if clean and on("cmc"):
            passes["clean_joint"] = (1 + P + L, True)
    if on("cic"):
        passes["cross"] = (2 + P + L, True)
    if not (mc.momentum == 0 and clean and (on("itc") or on("xmc"))):
        passes.update(key_image=(1 + P, False), key_text=(1 + L, False))
    return passes


def flops_per_pair(mc):
    """Analytic training FLOPs per pair: forward = 2 x multiply-adds; a pass with gradient
    costs 3 x its forward (backward ~ 2 x), a no-grad key pass 1 x. Returns (total, parts)."""
    D, hid, E = mc.width, int(mc.width * mc.mlp_ratio), mc.embed_dim
    head = {"linear": D * E, "mlp": D * D + D * E,
            "mocov3": D * 4 * D + 16 * D * D + 4 * D * E}[mc.head_type]
    pred = E * 4 * D * 2 if mc.head_type == "mocov3" else 0  # the query-side predictor
    parts = {}
    for name, (n, grad) in pass_tokens(mc).items():
        macs = mc.depth * (n * (4 * D * D + 2 * D * hid) + 2 * n * n * D) + head + (pred if grad else 0)
        if "image" in name or "joint" in name or "cross" in name:
            macs += mc.num_patches * 3 * mc.patch_size ** 2 * D  # patch embedding
        if grad and mc.mim > 0 and name.startswith("student") and "text" not in name:
            macs += mc.num_patches * D * 3 * mc.patch_size ** 2
        if grad and mc.mlm > 0 and name.startswith("student") and "image" not in name:
            macs += mc.mlm_slots * (D * D + D * mc.vocab_size)
        parts[name] = 2 * macs * (3 if grad else 1)
    return sum(parts.values()), parts


def synthetic_batch(mc, B, device, seed=0):
    """A batch of DESIGN.md's table with random pixels and ids and real masks."""
    import numpy as np
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, mc.vocab_size, (B, mc.max_text_len), generator=g)
    mask = torch.ones(B, mc.max_text_len, dtype=torch.bool)
    masker = D.Masker(mc.num_patches, 0.4 if mc.mim > 0 else 0.0, "random",
                      0.15 if mc.mlm > 0 else 0.0, mc.vocab_size,
                      np.ones(mc.vocab_size, dtype=bool), mc.mlm_slots)
    samples = []
    for i in range(B):
        m = masker(np.random.default_rng([seed, i]), ids[i].numpy(), mask[i].numpy())
        samples.append({"image": torch.randn(3, mc.image_size, mc.image_size, generator=g),
                        "text_ids": ids[i], "text_mask": mask[i], "index": i, "bad": 0,
                        **{k: torch.as_tensor(v) for k, v in m.items()}})
    return {k: v.to(device) for k, v in D.collate(samples).items()}


def timed(fn, device, n):
    """Median seconds per call over n calls (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def peak_flops(device, dtype):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in PEAK_BF16_TFLOPS.items():
            if k in name:
                return v * 1e12, f"{k} bf16 dense spec"
    n = 2048  # CPU: measured in this run with a large matmul in the same precision
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ a, device, 5)
    return 2 * n ** 3 / t, f"measured {n}x{n} matmul ({dtype})"


def bench_step(model, opt, batch, mc, device, prec, fwd):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
            loss = fwd(batch)["loss"]
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        if bool(torch.isfinite(loss.detach()) & torch.isfinite(gn)):
            opt.step()
            model.update_key_encoder(0.99)
        opt.zero_grad(set_to_none=True)
    return step


def bench(tc, mc, device):
    """Training-step speed on synthetic batches: pairs/s, per-pass breakdown, FLOPs, MFU,
    OneR vs CLIP-mode, our encoder vs torch.nn.TransformerEncoder. Writes bench.json."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.utils.flop_counter import FlopCounterMode
    prec, n = precision(tc, device), tc.bench_steps
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    ac = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")  # noqa: E731
    B = tc.batch_size
    model = OneR(mc).to(device)
    opt = make_optimizer(model, tc, device)
    batch = synthetic_batch(mc, B, device)
    fwd = torch.compile(model) if tc.compile else model
    step = bench_step(model, opt, batch, mc, device, prec, fwd)
    for _ in range(3):  # warm-up (compiles here)
        step()
    graphs = counters["stats"]["unique_graphs"]
    t_step = timed(step, device, n)
    recompiles = counters["stats"]["unique_graphs"] - graphs
    total, parts = flops_per_pair(mc)
    with FlopCounterMode(display=False) as fc:  # cross-check: one eager fwd+bwd
        with ac():
            model(batch)["loss"].backward()
    opt.zero_grad(set_to_none=True)
    counted = fc.get_total_flops() / B
    peak, peak_src = peak_flops(device, dtype)

    # per-pass breakdown, each pass alone (forward only; backward and optimiser measured apart)
    E = model.student.encoder
    b, P = batch, mc.num_patches
    K = model._eval_tower()
    pieces = {
        "student_image": lambda: E(image=E.embed_image(b["images"], b["image_mask_uni"])),
        "student_text": lambda: E(text=E.embed_text(b["text_input_uni"], b["text_masked_uni"]),
                                  text_mask=b["text_mask"]),
        "student_joint": lambda: E(image=E.embed_image(b["images"], b["image_mask_joint"]),
                                   text=E.embed_text(b["text_input_joint"], b["text_masked_joint"]),
                                   text_mask=b["text_mask"]),
        "cross": lambda: E(image=E.embed_image(b["images"]), text=E.embed_text(b["text_ids"]),
                           text_mask=b["text_mask"], cross=True),
        "clean_image": lambda: E(image=E.embed_image(b["images"])),
        "clean_text": lambda: E(text=E.embed_text(b["text_ids"]), text_mask=b["text_mask"]),
        "clean_joint": lambda: E(image=E.embed_image(b["images"]), text=E.embed_text(b["text_ids"]),
                                 text_mask=b["text_mask"]),
    }
    def keys():
        with torch.no_grad():
            K.encoder(image=K.encoder.embed_image(b["images"]))
            K.encoder(text=K.encoder.embed_text(b["text_ids"]), text_mask=b["text_mask"])
    active = pass_tokens(mc)
    breakdown = {}
    with ac():
        for name, fn in pieces.items():
            if name in active:
                breakdown[name + "_fwd"] = timed(fn, device, n)
        if "key_image" in active:
            breakdown["key_passes"] = timed(keys, device, n)
        t_fwd = timed(lambda: model(batch), device, n)
    breakdown["losses_heads_gather"] = max(0.0, t_fwd - sum(breakdown.values()))
    def fwd_bwd():
        with ac():
            model(batch)["loss"].backward()
    breakdown["backward"] = max(0.0, timed(fwd_bwd, device, n) - t_fwd)
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    def opt_ema():
        opt.step()
        model.update_key_encoder(0.99)
    breakdown["optimizer_ema"] = timed(opt_ema, device, n)
    opt.zero_grad(set_to_none=True)

    # CLIP mode: ITC on two clean unmasked passes, no key encoder, same model and batch
    clip_cfg = dataclasses.replace(mc, itc=1.0, xmc=0.0, cic=0.0, cmc=0.0, mlm=0.0, mim=0.0,
                                   momentum=0.0, query_view="clean")
    clip = OneR(clip_cfg).to(device)
    clip_opt = make_optimizer(clip, tc, device)
    clip_fwd = torch.compile(clip) if tc.compile else clip
    clip_step = bench_step(clip, clip_opt, batch, clip_cfg, device, prec, clip_fwd)
    t_clip = timed(clip_step, device, n)
    clip_flops = flops_per_pair(clip_cfg)[0]

    # our encoder vs torch.nn.TransformerEncoder at the image pass's shapes, alternated
    D_, N = mc.width, 1 + P
    ref = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D_, mc.heads, int(D_ * mc.mlp_ratio), dropout=0.0,
                                         activation="gelu", batch_first=True, norm_first=True),
        mc.depth, norm=torch.nn.LayerNorm(D_), enable_nested_tensor=False).to(device)
    x = torch.randn(B, N, D_, device=device)
    def ours_train():
        with ac():
            h = x
            for blk in E.blocks:
                h = blk(h)
            E.ln_f(h).float().sum().backward()
    def ref_train():
        with ac():
            ref(x).float().sum().backward()
    def ours_infer():
        with torch.inference_mode(), ac():
            model.encode_image(b["images"])
    def ref_infer():
        with torch.inference_mode(), ac():
            ref(x)
    ratios = {}
    for name, a, c in (("train", ours_train, ref_train), ("inference", ours_infer, ref_infer)):
        ref.train(name == "train")
        ta, tb = [], []
        for _ in range(3):  # alternate to share any drift of clock or load
            ta.append(timed(a, device, max(2, n // 3)))
            tb.append(timed(c, device, max(2, n // 3)))
        ratios[name] = (min(ta), min(tb))
    model.zero_grad(set_to_none=True)

    kernel = "n/a (CPU)"
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad(), ac():
            pieces["student_image"]()
        names = " ".join(e.key.lower() for e in prof.key_averages())
        kernel = "flash" if "flash" in names else "efficient" if "efficient" in names else "math/other"

    pairs_s = B / t_step
    res = {
        "device": str(device), "precision": prec, "compile": tc.compile, "batch": B,
        "model": {k: getattr(mc, k) for k in ("width", "depth", "heads", "patch_size",
                                              "image_size", "max_text_len", "vocab_size")},
        "losses": mc.active, "step_s": t_step, "pairs_per_s": pairs_s,
        "flops_per_pair": total, "flops_per_pair_by_pass": parts,
        "flops_per_pair_counted": counted, "flops_counted_over_analytic": counted / total,
        "achieved_tflops": total * pairs_s / 1e12, "peak_tflops": peak / 1e12, "peak_source": peak_src,
        "mfu": total * pairs_s / peak, "breakdown_s": breakdown,
        "clip_step_s": t_clip, "clip_flops_per_pair": clip_flops,
        "time_ratio_oner_over_clip": t_step / t_clip, "flop_ratio_oner_over_clip": total / clip_flops,
        "step_time_over_flop_budget": (t_step / t_clip) / (total / clip_flops),
        "encoder_train_s": ratios["train"][0], "torch_encoder_train_s": ratios["train"][1],
        "encoder_train_ratio": ratios["train"][0] / ratios["train"][1],
        "encode_image_infer_s": ratios["inference"][0], "torch_encoder_infer_s": ratios["inference"][1],
        "encoder_infer_ratio": ratios["inference"][0] / ratios["inference"][1],
        "recompiles_after_warmup": recompiles if tc.compile else None, "sdpa_kernel_image_pass": kernel,
    }
    if device.type == "cuda":
        res["gpu_hours_per_epoch_4m"] = 5.1e6 / pairs_s / 3600
        res["gpu_hours_30_epochs_4m"] = 30 * res["gpu_hours_per_epoch_4m"]
    lines = [f"bench: {B} pairs/step on {device} ({prec}, compile {tc.compile}), model width "
             f"{mc.width} depth {mc.depth} patch {mc.patch_size} image {mc.image_size}, losses "
             f"{'+'.join(mc.active)}",
             f"  step {1e3 * t_step:.1f} ms   {pairs_s:.1f} pairs/s",
             f"  FLOPs/pair {total / 1e9:.3f} G analytic, {counted / 1e9:.3f} G counted "
             f"(ratio {counted / total:.3f})",
             f"  achieved {res['achieved_tflops']:.3f} TFLOP/s of {peak / 1e12:.2f} ({peak_src}): "
             f"MFU {100 * res['mfu']:.1f}%",
             "  breakdown (ms): " + "  ".join(f"{k} {1e3 * v:.1f}" for k, v in breakdown.items()),
             f"  OneR vs CLIP-mode: time x{t_step / t_clip:.2f}, FLOPs x{total / clip_flops:.2f} "
             f"-> time/FLOP budget {res['step_time_over_flop_budget']:.2f} (target <= 1.10)",
             f"  encoder vs torch.nn.TransformerEncoder: train fwd+bwd x{res['encoder_train_ratio']:.2f}"
             f" (target <= 1.00), inference x{res['encoder_infer_ratio']:.2f} (target <= 1.05)",
             f"  recompiles after warm-up: {res['recompiles_after_warmup']}   SDPA kernel: {kernel}"]
    if device.type == "cuda":
        lines.append(f"  4M corpus: {res['gpu_hours_per_epoch_4m']:.1f} GPU-h/epoch, "
                     f"{res['gpu_hours_30_epochs_4m']:.0f} GPU-h for 30 epochs (paper: 832 A100-h)")
    if tc.bench_loader:
        res["loader"] = bench_loader(tc, mc)
        for r in res["loader"]:
            need = pairs_s / max(1e-9, r["images_per_s"] / max(1, r["workers"]))
            lines.append(f"  loader: {r['workers']} workers {r['images_per_s']:.0f} pairs/s "
                         f"(~{need:.1f} workers to feed this step)")
    print("\n".join(lines), flush=True)
    os.makedirs(tc.run_dir, exist_ok=True)
    with open(os.path.join(tc.run_dir, "bench.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res


def bench_loader(tc, mc):
    """Decode + transform + mask + collate throughput of the real data path."""
    tokenizer, train_json, root, _, _ = build_data(tc, mc, 0, 1)
    mc = dataclasses.replace(mc, vocab_size=tokenizer.vocab_size)
    ds = make_dataset(tc, mc, tokenizer, train_json, root, 0, 1)
    sampler = D.ResumableSampler(len(ds), tc.batch_size, 0, 1, seed=tc.seed)
    return D.loader_benchmark(ds, sampler, tc.batch_size, workers_list=(0, 1, 2), batches=5)


# ----------------------------------------------------------------------------- SLURM
class SlurmJob:
    """What submitit runs on every task: export the distributed environment, call main.
    On preemption or time-out submitit calls checkpoint() on rank 0 inside its signal
    handler and exits right after, so no training step runs again: checkpoint() only
    requeues, and the new job resumes from the latest complete checkpoint in run_dir
    (the work lost is bounded by --save_minutes)."""

    def __init__(self, tc, mc):
        self.tc, self.mc = tc, mc

    def __call__(self):
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        main(self.tc, self.mc)

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(SlurmJob(self.tc, self.mc))


def submit(tc, mc):
    import submitit
    tc = dataclasses.replace(tc, slurm=False)
    folder = os.path.join(tc.run_dir, "submitit", "%j")
    executor = {"slurm": submitit.AutoExecutor, "local": submitit.LocalExecutor,
                "debug": submitit.DebugExecutor}[tc.cluster](folder=folder)
    params = dict(timeout_min=tc.time_min if tc.cluster == "local" else math.ceil(tc.time_min),
                  nodes=tc.nodes, tasks_per_node=tc.gpus_per_node,
                  gpus_per_node=tc.gpus_per_node, cpus_per_task=tc.cpus_per_task,
                  name=f"oner-{tc.preset}")
    if tc.cluster == "slurm":
        params.update(slurm_signal_delay_s=tc.signal_delay_s, mem_gb=tc.mem_gb or None)
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(tc, key):
                params[f"slurm_{key}"] = getattr(tc, key)
        params = {k: v for k, v in params.items() if v is not None}
    elif tc.cluster == "local":
        params.update(signal_delay_s=tc.signal_delay_s)
        params.pop("nodes")
        params["gpus_per_node"] = 0 if not torch.cuda.is_available() else params["gpus_per_node"]
    executor.update_parameters(**params)
    job = executor.submit(SlurmJob(tc, mc))
    print(f"submitted job {job.job_id}: logs in {folder.replace('%j', str(job.job_id))}, "
          f"run directory {tc.run_dir}")
    return job


if __name__ == "__main__":
    tc, mc = resolve(sys.argv[1:])
    if tc.slurm:
        submit(tc, mc)
    else:
        main(tc, mc)
