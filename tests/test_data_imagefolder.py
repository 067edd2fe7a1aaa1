"""ImageFolderDataset claims: classes are the sorted subfolder names, labels follow
them, images come out as eval-transformed tensors; a class-name file (.txt or .json)
supplies readable names and must match the folder count; a missing root names the
expected layout.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_imagefolder.py
"""
import json

import numpy as np
import pytest
from PIL import Image

import data


def test_image_folder(tmp_path):
    for ci, cls in enumerate(["n02", "n01", "n03"]):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * ci, np.uint8)).save(tmp_path / "val" / cls / f"{k}.jpg")
    (tmp_path / "val" / "n01" / "notes.txt").write_text("not an image")
    tf = data.ImageTransform(16, train=False)
    ds = data.ImageFolderDataset(tmp_path / "val", tf)
    assert ds.classes == ["n01", "n02", "n03"] and len(ds) == 6
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0
    assert [ds[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    (tmp_path / "names.txt").write_text("tench\ngoldfish\nshark\n")
    assert data.ImageFolderDataset(tmp_path / "val", tf, tmp_path / "names.txt").class_names == ["tench", "goldfish", "shark"]
    (tmp_path / "names.json").write_text(json.dumps({"n03": "c", "n01": "a", "n02": "b"}))
    assert data.ImageFolderDataset(tmp_path / "val", tf, tmp_path / "names.json").class_names == ["a", "b", "c"]
    (tmp_path / "short.txt").write_text("one\n")
    with pytest.raises(ValueError):
        data.ImageFolderDataset(tmp_path / "val", tf, tmp_path / "short.txt")
    with pytest.raises(FileNotFoundError, match="subfolder per class"):
        data.ImageFolderDataset(tmp_path / "nope", tf)
