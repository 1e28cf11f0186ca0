"""MMF dataset builder `easy_vqa`: the easy-VQA data set shipped inside the PyPI package `easy-vqa`.

64x64 images of one coloured shape, 13 answers (shape, colour, yes/no). Nothing to download: images,
questions and answers are read from the installed package (or from ``dataset_config.easy_vqa.data_dir``
holding ``train/`` and ``test/`` folders in the package's layout). Splits: train = the package's train
split; the package's test split is halved by image id into val (ids < 500) and test.

Each sample: ``image`` [3, S, S] float in [0, 1] (S = ``image_size``), ``text`` bag of words [V],
``targets`` the answer index.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .flavour import install_shims

install_shims()  # before the first `import mmf`
from mmf.common.registry import registry
from mmf.common.sample import Sample
from mmf.datasets.base_dataset import BaseDataset
from mmf.datasets.base_dataset_builder import BaseDatasetBuilder


def package_data_dir() -> Path:
    try:
        import easy_vqa
    except ImportError as exc:
        raise ImportError("easy-VQA needs the `easy-vqa` package: pip install 'deqfusion[mmf]'") from exc
    return Path(easy_vqa.__file__).parent / "data"


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def read_split(data_dir: Path, folder: str):
    """(questions, answers, image ids) and {image id: png path} of the package's ``train`` or ``test`` folder."""
    questions_file = data_dir / folder / "questions.json"
    if not questions_file.is_file():
        raise FileNotFoundError(f"dataset_config.easy_vqa.data_dir: {questions_file} not found")
    rows = json.loads(questions_file.read_text())
    images = {int(p.stem): p for p in (data_dir / folder / "images").glob("*.png")}
    return [r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows], images


def load_images(paths: dict[int, Path], size: int) -> dict[int, torch.Tensor]:
    from PIL import Image

    out = {}
    for image_id, path in paths.items():
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out[image_id] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # uint8 [3, S, S]
    return out


class EasyVQADataset(BaseDataset):
    def __init__(self, config, dataset_type, data_dir: Path, vocab: list[str], answers: list[str]):
        super().__init__("easy_vqa", config, dataset_type)
        folder = "train" if dataset_type == "train" else "test"
        questions, answer_texts, image_ids, paths = read_split(data_dir, folder)
        rows = range(len(questions))
        if dataset_type != "train":  # the package's test split, halved by image id
            rows = [i for i in rows if (image_ids[i] < 500) == (dataset_type == "val")]
        limit = (config.get("max_samples", None) or {}).get(dataset_type, None)
        rows = list(rows)[:limit] if limit else list(rows)
        index = {w: i for i, w in enumerate(vocab)}
        self.text = torch.zeros(len(rows), len(vocab))
        for j, i in enumerate(rows):
            for w in tokenize(questions[i]):
                if w in index:
                    self.text[j, index[w]] = 1.0
        answer_index = {a: i for i, a in enumerate(answers)}
        self.targets = torch.tensor([answer_index[answer_texts[i]] for i in rows])
        self.image_ids = [image_ids[i] for i in rows]
        self.questions = [questions[i] for i in rows]
        self.images = load_images({k: paths[k] for k in set(self.image_ids)}, int(config.get("image_size", 32)))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, idx):
        sample = Sample()
        sample.image = self.images[self.image_ids[idx]].float() / 255.0
        sample.text = self.text[idx]
        sample.targets = self.targets[idx]
        return sample


@registry.register_builder("easy_vqa")
class EasyVQABuilder(BaseDatasetBuilder):
    def __init__(self):
        super().__init__("easy_vqa")

    @classmethod
    def config_path(cls):
        from . import CONFIG_DIR

        return str(CONFIG_DIR / "datasets" / "easy_vqa.yaml")

    def _data_dir(self, config) -> Path:
        given = config.get("data_dir", None)
        return Path(given) if given else package_data_dir()

    def build(self, config, dataset_type="train", *args, **kwargs):
        self._data_dir(config)  # nothing to download; fail early on a wrong data_dir

    def load(self, config, dataset_type="train", *args, **kwargs):
        data_dir = self._data_dir(config)
        answers = [a.strip() for a in (data_dir / "answers.txt").read_text().splitlines() if a.strip()]
        train_questions = read_split(data_dir, "train")[0]
        vocab = sorted({w for q in train_questions for w in tokenize(q)})
        self.vocab_size, self.num_answers = len(vocab), len(answers)
        return EasyVQADataset(config, dataset_type, data_dir, vocab, answers)

    def update_registry_for_model(self, config):
        registry.register("easy_vqa_vocab_size", self.vocab_size)
        registry.register("easy_vqa_num_final_outputs", self.num_answers)
