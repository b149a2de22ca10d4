"""dam-data into dam-train: stage 1 -> merge -> train.data.MixedRegionDataset reads the rows, with the
image root taken from the merged manifest when the dataset's `root` is unset."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("datasets")

from transformers import AutoTokenizer  # noqa: E402

from tests.sdp_fixtures import DeterministicLabeler, coco_config, make_coco  # noqa: E402

from dam.configio import ConfigError  # noqa: E402
from dam.modeling import DamConfig  # noqa: E402
from dam.processing import IGNORE_INDEX, DamProcessor  # noqa: E402
from data_pipeline.merge import merge_datasets  # noqa: E402
from data_pipeline.stage1 import run_stage1  # noqa: E402
from tests.train_fixtures import save_tiny_checkpoint  # noqa: E402
from train.config import DataConfig, DatasetConfig  # noqa: E402
from train.data import MixedRegionDataset  # noqa: E402


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> DamProcessor:
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("train") / "checkpoint")
    return DamProcessor(AutoTokenizer.from_pretrained(checkpoint), DamConfig.from_pretrained(checkpoint))


def dataset(processor: DamProcessor, spec: DatasetConfig) -> MixedRegionDataset:
    return MixedRegionDataset(DataConfig(datasets=[spec]), processor, num_video_frames=8)


def test_stage1_output_merged_is_a_training_dataset(processor, tmp_path):
    coco = make_coco(tmp_path / "coco")
    run_stage1(coco_config(coco, tmp_path / "stage1"), labeler=DeterministicLabeler(), progress=False)
    merged = tmp_path / "merged"
    merge_datasets([tmp_path / "stage1"], merged, progress=False)
    data = dataset(processor, DatasetConfig(path=str(merged)))  # no root: the manifest's image_root (coco/images)
    assert len(data) == 5 and data.sources[0].root == coco.images
    item = data[0]
    assert item["num_corrupt_rows"] == 0 and item["pixel_values"].shape[0] == 1
    row = data.sources[0].rows[int(data.index[0][1])]
    tokenizer = processor.tokenizer
    answer = tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])
    assert tokenizer.decode(tokenizer(row["caption"].rstrip(" ."), add_special_tokens=False).input_ids) in answer  # the tiny vocab: <unk>s


def test_manifest_image_root_errors_and_explicit_root(processor, tmp_path):
    coco = make_coco(tmp_path / "coco")
    run_stage1(coco_config(coco, tmp_path / "stage1"), labeler=DeterministicLabeler(), progress=False)
    merge_datasets([tmp_path / "stage1"], tmp_path / "merged", progress=False)
    moved = tmp_path / "moved"
    shutil.move(str(coco.images), moved)
    with pytest.raises(ConfigError, match=r"data\.datasets\.0\.root is unset and the image_root .* is not a folder .*set data\.datasets\.0\.root"):
        dataset(processor, DatasetConfig(path=str(tmp_path / "merged")))
    data = dataset(processor, DatasetConfig(path=str(tmp_path / "merged"), root=str(moved)))  # an explicit root wins
    assert data.sources[0].root == moved and data[0]["num_corrupt_rows"] == 0
    (tmp_path / "merged" / "manifest.json").write_text("{trunc")
    with pytest.raises(ConfigError, match=r"data\.datasets\.0\.path: .*manifest\.json.* is unreadable"):
        dataset(processor, DatasetConfig(path=str(tmp_path / "merged")))
