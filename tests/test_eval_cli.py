"""`python eval.py` end to end on a real (untrained, tiny) OneR checkpoint.

Proves: every command of issue 6 runs on a checkpoint in train.py's format and writes the
documented JSON keys (retrieval keys as retrieval_metrics returns them, "top1"/"top5" for
classification and probes) and a printed table: the built-in evaluations (--all, and each
of --zeroshot/--linear_probe/--localize/--multimodal builtin alone); COCO layout with the
poster's numbers printed beside ours; --retrieval with an unreadable image (skipped and
counted, not fatal); zero-shot classification and the linear probe on image folders
(class-name and template files, features cached on disk and reused); --localize writes a
PNG of (words + 1) panels of the image's size; a retrieval grid PNG; a missing annotation
file, image root or image folder gives exit code 2 and one line naming the path and the
expected layout (no traceback).

The checkpoint is an untrained OneR ("mu" shrunk to width 32) saved in train.py's
checkpoint format, on a 200-image built-in set; the numbers are therefore near chance and
are not asserted, only their presence, ranges and the files. Most commands run
in-process through eval.main(argv); one runs as a subprocess to check the exit code.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval_cli.py   (about 15 s)
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIEVAL_KEYS = {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean", "n_images", "n_texts"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import data
    from oner import OneR, OneRConfig
    tmp = tmp_path_factory.mktemp("evalcli")
    paths = data.ensure_synth(str(tmp / "builtin"), n_images=200)
    tok = data.load_tokenizer(paths["tokenizer"])
    torch.manual_seed(0)
    cfg = OneRConfig.from_name("mu", width=32, depth=1, heads=2, patch_size=8, image_size=32, embed_dim=16,
                               max_text_len=24, vocab_size=tok.vocab_size)
    ckpt = str(tmp / "ckpt_00000000.pt")
    torch.save({"model": OneR(cfg).state_dict(), "model_config": cfg.to_dict(), "tokenizer": tok.identity(),
                "step": 0, "train_config": {"data": "builtin", "data_dir": paths["root"]}}, ckpt)
    return {"tmp": tmp, "paths": paths, "ckpt": ckpt}


def run_main(capsys, *args):
    rc = ev.main(["--quiet", "--batch_size", "16", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def image_folder(root, paths, split, attribute="object", limit=None):
    """root/<class name with '_'>/<image>.png from the built-in set's attribute labels."""
    attrs = json.load(open(paths["attributes"]))
    names = attrs["classes"][attribute]
    for r in attrs["images"][split][:limit]:
        d = os.path.join(root, names[r[attribute]].replace(" ", "_"))
        os.makedirs(d, exist_ok=True)
        shutil.copy(os.path.join(paths["image_root"], r["image"]), d)
    return str(root)


def test_all_builtin_end_to_end(setup, capsys):
    out_json, grid, loc = (str(setup["tmp"] / n) for n in ("all.json", "grid.png", "loc.png"))
    rc, out, _ = run_main(capsys, "--checkpoint", setup["ckpt"], "--all", "--out", out_json, "--grid", grid,
                          "--localize", "builtin", "--out_png", loc)
    assert rc == 0
    res = json.load(open(out_json))
    assert set(res["retrieval"]) == {"builtin test", "builtin test_comp"}
    for r in res["retrieval"].values():
        assert RETRIEVAL_KEYS <= set(r) and r["n_images"] == 20 and r["n_texts"] == 100
        assert r["skipped"] == 0 and set(r["chance"]) == {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "mean"}
    for sec in ("zeroshot", "linear_probe"):
        assert 0 <= res[sec]["top1"] <= res[sec]["top5"] <= 100
    assert res["zeroshot"]["n_classes"] == 40 and res["zeroshot"]["chance_top1"] == pytest.approx(2.5)
    assert {"object", "shape", "colour"} <= set(res["zeroshot"]["attributes"])
    assert {"object", "shape", "colour", "size", "count"} == set(res["linear_probe"]["attributes"])
    assert res["linear_probe"]["n_train"] == 200 and res["linear_probe"]["n_test"] == 20
    p = res["pointing"]
    assert 0 <= p["accuracy"] <= 100 and 0 < p["random_pixel"] < 100 and p["n"] >= 20
    assert 0 <= p["multi_object"]["random_heatmaps"] <= 100
    m = res["multimodal"]
    for q in ("pair", "image_only", "text_only", "image_plus_text", "chance"):
        assert set(m[q]) == {"r1", "r5", "r10"}
    assert m["r1"] == m["pair"]["r1"] and m["gallery_size"] == 20 + m["n_queries"]
    assert m["chance"]["r1"] == pytest.approx(100 / m["gallery_size"])
    for title in ("zero-shot retrieval", "chance (random scores)", "zero-shot classification", "linear probe",
                  "pointing game", "multimodal retrieval", "image only", "text only"):
        assert title in out
    assert Image.open(grid).size == (2 * 96 + 5 * 102 + 6, 8 * 102 + 6)       # 8 queries x top-5
    assert Image.open(loc).size[1] == 160 + 22


def test_evaluate_builtin_api(setup):
    model, tok, _ = ev.load_checkpoint(setup["ckpt"])
    model.train()                                       # as train.py would hand it over
    res = ev.evaluate_builtin(model, tok, setup["paths"], device="cpu", batch_size=32, probe_train=50,
                              progress=False)
    assert set(res) == {"retrieval", "zeroshot", "linear_probe", "pointing", "multimodal", "seconds"}
    assert res["linear_probe"]["n_train"] == 50
    assert model.training                               # mode restored


def test_default_is_builtin_retrieval(setup, capsys):
    out_json = str(setup["tmp"] / "default.json")
    rc, out, _ = run_main(capsys, "--checkpoint", setup["ckpt"], "--out", out_json)
    assert rc == 0
    res = json.load(open(out_json))
    assert set(res["retrieval"]) == {"builtin test", "builtin test_comp"}
    assert not {"zeroshot", "linear_probe", "pointing", "multimodal"} & set(res)
    assert "images captions skipped" in out and "total time" in out


def test_coco_layout_prints_poster_numbers(setup, capsys):
    coco = setup["tmp"] / "coco"
    coco.mkdir()
    shutil.copy(setup["paths"]["test"], coco / "coco_karpathy_test.json")
    out_json = str(setup["tmp"] / "coco.json")
    rc, out, _ = run_main(capsys, "--checkpoint", setup["ckpt"], "--coco", str(coco),
                          "--image_root", setup["paths"]["image_root"], "--out", out_json)
    assert rc == 0
    r = json.load(open(out_json))["retrieval"]["coco"]
    assert RETRIEVAL_KEYS <= set(r)
    assert r["poster"]["poster (4M pairs, B/16) zero-shot"]["tr1"] == 62.9
    assert "poster (4M pairs, B/16) zero-shot" in out and "62.9" in out and "66.1" in out


def test_unreadable_image_is_skipped_and_reported(setup, capsys):
    root = setup["tmp"] / "broken"
    shutil.copytree(os.path.join(setup["paths"]["image_root"], "images"), root / "images")
    entries = json.load(open(setup["paths"]["test"]))
    (root / entries[3]["image"]).write_bytes(b"<html>not an image</html>")
    out_json = str(setup["tmp"] / "broken.json")
    rc, out, _ = run_main(capsys, "--checkpoint", setup["ckpt"], "--retrieval", setup["paths"]["test"],
                          "--image_root", str(root), "--out", out_json, "--grid", str(setup["tmp"] / "g.png"))
    assert rc == 0
    r = json.load(open(out_json))["retrieval"]["test"]
    assert r["skipped"] == 1 and r["skipped_captions"] == len(entries[3]["caption"])
    assert r["n_images"] == len(entries) - 1
    assert os.path.isfile(setup["tmp"] / "g.png")


@pytest.mark.parametrize("flag", ["coco", "flickr"])
def test_missing_annotation_file_names_path_and_layout(setup, capsys, flag):
    d = setup["tmp"] / f"empty_{flag}"
    d.mkdir()
    rc, _, err = run_main(capsys, "--checkpoint", setup["ckpt"], f"--{flag}", str(d))
    fname = {"coco": "coco_karpathy_test.json", "flickr": "flickr30k_test.json"}[flag]
    assert rc == 2
    assert os.path.join(str(d), fname) in err and "ALBEF/BLIP" in err and '"caption"' in err


def test_missing_image_root_exits_2_without_traceback(setup):
    missing = str(setup["tmp"] / "no_such_images")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", setup["ckpt"],
                        "--retrieval", setup["paths"]["test"], "--image_root", missing],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and missing in p.stderr and "Expected layout" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_other_user_errors_exit_2(setup, capsys):
    bad = setup["tmp"] / "bad_templates.txt"
    bad.write_text("a photo of a thing\n")
    for args, needle in [(["--zeroshot", str(setup["tmp"] / "nope")], "<class>"),
                         (["--zeroshot", "builtin", "--templates", str(bad)], "{}"),
                         (["--localize", "a", "b", "c"], "--localize"),
                         (["--retrieval", setup["paths"]["test"]], "--image_root")]:
        rc, _, err = run_main(capsys, "--checkpoint", setup["ckpt"], *args)
        assert rc == 2 and needle in err, (args, err)
    rc, _, err = run_main(capsys, "--checkpoint", str(setup["tmp"] / "none.pt"))
    assert rc == 2 and "none.pt" in err


def test_zeroshot_image_folder_with_cache(setup, capsys):
    folder = image_folder(setup["tmp"] / "zs", setup["paths"], "test")
    tpl = setup["tmp"] / "templates.txt"
    tpl.write_text("a {}\na picture of a {}\n")
    cache = setup["tmp"] / "zs_cache"
    args = ["--checkpoint", setup["ckpt"], "--zeroshot", folder, "--templates", str(tpl), "--cache_dir", str(cache)]
    rc, out, _ = run_main(capsys, *args, "--out", str(setup["tmp"] / "zs1.json"))
    assert rc == 0 and "zero-shot classification" in out
    r1 = json.load(open(setup["tmp"] / "zs1.json"))["zeroshot"]
    n_classes = len(os.listdir(folder))
    assert r1["n_images"] == 20 and r1["n_classes"] == n_classes and r1["templates"] == ["a {}", "a picture of a {}"]
    assert 0 <= r1["top1"] <= r1["top5"] <= 100
    assert len(list(cache.glob("features_*.pt"))) == 1
    # second run: features from the cache, same numbers; a class-name file replaces folder names
    names = setup["tmp"] / "names.txt"
    names.write_text("\n".join(sorted(os.listdir(folder))).replace("_", " ") + "\n")
    rc, _, _ = run_main(capsys, *args, "--classnames", str(names), "--out", str(setup["tmp"] / "zs2.json"))
    r2 = json.load(open(setup["tmp"] / "zs2.json"))["zeroshot"]
    assert rc == 0 and (r2["top1"], r2["top5"]) == (r1["top1"], r1["top5"])
    assert len(list(cache.glob("features_*.pt"))) == 1


def test_linear_probe_image_folders(setup, capsys):
    train = image_folder(setup["tmp"] / "lp_train", setup["paths"], "train", "shape")
    val = image_folder(setup["tmp"] / "lp_val", setup["paths"], "test", "shape")
    out_json = setup["tmp"] / "lp" / "lp.json"
    rc, out, _ = run_main(capsys, "--checkpoint", setup["ckpt"], "--linear_probe", train, val, "--out", str(out_json))
    assert rc == 0 and "linear probe" in out
    r = json.load(open(out_json))["linear_probe"]
    assert r["n_train"] == 200 and r["n_test"] == 20 and r["n_classes"] == 5
    assert 0 <= r["top1"] <= r["top5"] <= 100 and r["wd"] in [s[0] for s in r["sweep"]]
    assert len(list((setup["tmp"] / "lp").glob("features_*.pt"))) == 2        # cached beside --out


def test_each_builtin_evaluation_alone(setup, capsys):
    out_json = str(setup["tmp"] / "each.json")
    rc, out, _ = run_main(capsys, "--checkpoint", setup["ckpt"], "--zeroshot", "builtin", "--linear_probe",
                          "builtin", "--probe_train", "100", "--localize", "builtin", "--multimodal",
                          "--out", out_json)
    assert rc == 0
    res = json.load(open(out_json))
    assert "retrieval" not in res                       # another evaluation was asked for
    assert {"zeroshot", "linear_probe", "pointing", "multimodal"} <= set(res)
    assert res["linear_probe"]["n_train"] == 100 and os.path.isfile(res["linear_probe"]["feature_cache"])


@pytest.mark.parametrize("size,words", [((32, 32), "red circle"), ((40, 30), "a large blue square")])
def test_localize_png_size(setup, capsys, size, words):
    img = setup["tmp"] / f"img_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (60, 60, 60)).save(img)
    png = str(setup["tmp"] / f"loc_{size[0]}.png")
    out_json = str(setup["tmp"] / f"loc_{size[0]}.json")
    rc, out, _ = run_main(capsys, "--checkpoint", setup["ckpt"], "--localize", str(img), words,
                          "--out_png", png, "--out", out_json)
    assert rc == 0 and png in out
    side = min(size)                                     # the centre square the model sees
    s = -(-160 // side)                                  # draw_heatmaps_png's scale factor
    n = len(words.split())
    assert Image.open(png).size == ((n + 1) * s * side, s * side + 22)
    r = json.load(open(out_json))["localize"]
    assert r["words"] == words.split() and len(r["peaks"]) == n
