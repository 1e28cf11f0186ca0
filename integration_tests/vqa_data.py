"""Generated VQA data in the upstreams' own file layouts, for tests that run their real entry scripts: VQA-v2
question/annotation JSON (raw, as block.bootstrap and vqa.pytorch process it), bottom-up region features as
block.bootstrap reads them (one ``.pth`` per image), grid features as vqa.pytorch reads them (HDF5 + name list),
and skip-thoughts files with the real shapes (the weights cannot be downloaded here)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLORS = ["red", "blue", "green", "white", "black", "brown", "gray", "pink"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
THINGS = ["cat", "dog", "car", "tree", "bird", "boat", "cake", "kite"]
# 24 questions with 24 distinct answers (block keeps the top answers and logs the top 20 of them)
QUESTIONS = [q for c, n, t in zip(COLORS, NUMBERS, THINGS) for q in
             ((f"what color is the {t}", c), (f"how many {t}s are there", n), (f"what is on the {c} table", t))]
WORDS = sorted({w for q, _ in QUESTIONS for w in q.split()})
SPLITS = {"train2014": 8, "val2014": 4, "test2015": 2}      # images per split (COCO's split names)


def write_skipthoughts(folder: Path, words=WORDS) -> Path:
    """dictionary.txt, utable.npy, uni_skip.npz in the layout PyPI's `skipthoughts` reads (random float16 values;
    ~40 MB). The last word is left out of the dictionary (it falls back to UNK)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dictionary.txt").write_text("\n".join(["UNK", *words[:-1]]) + "\n")
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    np.save(folder / "utable.npy", rand(len(words), 620))
    np.savez(folder / "uni_skip.npz", encoder_W=rand(620, 4800), encoder_b=rand(4800), encoder_U=rand(2400, 4800),
             encoder_Wx=rand(620, 2400), encoder_bx=rand(2400), encoder_Ux=rand(2400, 2400))
    return folder


def image_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def write_vqa2_raw(annotations: Path, per_image: int = 3) -> dict[str, list[int]]:
    """The VQA-v2 JSONs under the names both upstreams read after unpacking (``mscoco_<split>_annotations.json``,
    ``OpenEnded_mscoco_<split>_questions.json``, test-dev included). Returns the image ids per split."""
    annotations.mkdir(parents=True, exist_ok=True)
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    ids, qid = {}, 0
    for s, (split, n_images) in enumerate(SPLITS.items()):
        ids[split] = [1000 * (s + 1) + i for i in range(n_images)]
        questions, anns = [], []
        for i, image_id in enumerate(ids[split]):
            for j in range(per_image):
                text, answer = QUESTIONS[(per_image * i + j) % len(QUESTIONS)]
                qid += 1
                questions.append({"image_id": image_id, "question": text + "?", "question_id": qid})
                anns.append({"question_id": qid, "image_id": image_id, "question_type": text.split()[0],
                             "answer_type": "number" if answer in NUMBERS else "other",
                             "multiple_choice_answer": answer,
                             "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                         for k in range(10)]})
        (annotations / f"OpenEnded_mscoco_{split}_questions.json").write_text(
            json.dumps({**meta, "data_subtype": split, "questions": questions}))
        if split != "test2015":
            (annotations / f"mscoco_{split}_annotations.json").write_text(
                json.dumps({**meta, "data_subtype": split, "annotations": anns}))
        else:
            (annotations / "OpenEnded_mscoco_test-dev2015_questions.json").write_text(
                json.dumps({**meta, "data_subtype": "test-dev2015", "questions": questions[: len(questions) // 2]}))
    return ids


def write_rcnn_features(folder: Path, ids: dict[str, list[int]], dim: int, regions: int = 36, seed: int = 0) -> Path:
    """block.bootstrap's bottom-up features: ``<image name>.pth`` with ``pooled_feat`` [regions, dim], ``rois`` and
    ``norm_rois`` [regions, 4]; a fixed number of regions per image, as block's collate (which pads only the
    questions and boxes) expects (the released features have 36)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, image_ids in ids.items():
        for image_id in image_ids:
            rois = torch.rand(regions, 4, generator=g) * 100
            torch.save({"pooled_feat": torch.rand(regions, dim, generator=g), "rois": rois, "norm_rois": rois / 100},
                       folder / f"{image_name(split, image_id)}.pth")
    return folder


def write_grid_features(folder: Path, ids: dict[str, list[int]], dim: int, grid: int, seed: int = 0) -> Path:
    """vqa.pytorch's extracted features (``extract.py``'s layout): ``<split>set.hdf5`` with ``att`` [N, dim, g, g] and
    ``noatt`` [N, dim], and ``<split>set.txt`` with one image name a line."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, image_ids in ids.items():
        name = split.rstrip("0123456789")      # train2014 -> train, val2014 -> val, test2015 -> test
        att = rng.random((len(image_ids), dim, grid, grid), dtype=np.float32)
        with h5py.File(folder / f"{name}set.hdf5", "w") as f:
            f.create_dataset("att", data=att)
            f.create_dataset("noatt", data=att.mean((2, 3)))
        (folder / f"{name}set.txt").write_text("".join(image_name(split, i) + "\n" for i in image_ids))
    return folder
