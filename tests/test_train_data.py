"""train.data without a Trainer: dataset items, mixture, corrupt rows, sampler order, collation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dam.modeling import DamConfig, DamForConditionalGeneration
from dam.processing import IGNORE_INDEX, DamProcessor
from dam.schema import video_row, write_shard
from tests.train_fixtures import save_tiny_checkpoint, write_squares_dataset
from train.augment import PromptAugmentation
from train.config import DataConfig, DatasetConfig
from dam.configio import ConfigError
from train.data import DamCollator, LengthGroupedSampler, MixedRegionDataset, _mixture
from train.smoke import colored_square

NUM_ROWS = 12  # rows 3, 7 and 11 are 3-frame videos


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DamProcessor]:
    root = tmp_path_factory.mktemp("train_data")
    checkpoint = save_tiny_checkpoint(root / "checkpoint")
    data = write_squares_dataset(root / "data", num_rows=NUM_ROWS, video_every=4)
    processor = DamProcessor(AutoTokenizer.from_pretrained(checkpoint), DamConfig.from_pretrained(checkpoint))
    return checkpoint, data, processor


def make_dataset(processor: DamProcessor, *datasets: DatasetConfig | Path, num_video_frames: int = 8, seed: int = 0, **data: object) -> MixedRegionDataset:
    specs = [d if isinstance(d, DatasetConfig) else DatasetConfig(path=str(d)) for d in datasets]
    return MixedRegionDataset(DataConfig(datasets=specs, **data), processor, num_video_frames, seed=seed)


def row_id(dataset: MixedRegionDataset, position: int) -> str:
    source, row = dataset.index[position]
    return dataset.sources[source].rows[int(row)]["id"]


def placeholders(item: dict, processor: DamProcessor) -> int:
    return sum(token == processor.image_token_id for token in item["input_ids"])


def answer(item: dict, processor: DamProcessor) -> str:
    return processor.tokenizer.decode([label for label in item["labels"] if label != IGNORE_INDEX])


def test_image_and_video_items(assets) -> None:
    _, data, processor = assets
    dataset = make_dataset(processor, data)
    size, tokens = processor.image_size, processor.num_image_tokens
    for position in range(len(dataset)):
        item, video = dataset[position], row_id(dataset, position).startswith("v")
        frames = 3 if video else 1
        assert item["pixel_values"].shape == (frames, 8, size, size)
        assert item["crop_is_full_image"].shape == (frames,)
        assert placeholders(item, processor) == frames * tokens
        labels, ids = item["labels"], item["input_ids"]
        start = labels.index(next(label for label in labels if label != IGNORE_INDEX))
        assert labels[:start] == [IGNORE_INDEX] * start and labels[start:] == ids[start:]
        assert IGNORE_INDEX not in labels[start:] and len(ids) == len(labels)
        row = dataset.sources[0].rows[int(dataset.index[position][1])]
        assert row["caption"].rstrip(" .") in answer(item, processor)
        assert item["num_corrupt_rows"] == 0


def test_long_video_is_subsampled_to_num_video_frames(assets, tmp_path: Path) -> None:
    _, _, processor = assets
    squares = [colored_square("blue", seed=t) for t in range(10)]
    write_shard([video_row("long", [m for _, m in squares], "a blue square .", "squares", frames=[i for i, _ in squares])], tmp_path / "a.parquet")
    item = make_dataset(processor, tmp_path, num_video_frames=8)[0]
    assert item["pixel_values"].shape[0] == 8
    assert placeholders(item, processor) == 8 * processor.num_image_tokens
    kept = [0, 1, 3, 4, 5, 6, 8, 9]  # np.linspace(0, 9, 8) rounded: evenly spread over the masklet
    expected = processor.pixel_values(processor.focal_prompts([squares[t] for t in kept]))
    torch.testing.assert_close(item["pixel_values"], expected)


def test_items_are_deterministic_per_key_and_vary_by_epoch(assets) -> None:
    _, data, processor = assets
    first, second = make_dataset(processor, data, seed=3), make_dataset(processor, data, seed=3)
    n = len(first)
    for key in (0, 5, n + 5, 2 * n + 1):
        a, b = first[key], second[key]
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
    epoch0 = [first[p]["input_ids"] for p in range(n)]
    epoch1 = [first[n + p]["input_ids"] for p in range(n)]
    assert epoch0 != epoch1, "the augmentation must draw new queries in a new epoch"
    for p in range(n):  # same row, so same image slots and answer
        assert placeholders({"input_ids": epoch0[p]}, processor) == placeholders({"input_ids": epoch1[p]}, processor)


def test_mixture_weights_repeat_rows_and_take_a_seeded_fraction() -> None:
    sizes, weights = (6, 10), (2.0, 0.5)
    mixture = _mixture(sizes, weights, seed=0)
    first, second = mixture[mixture[:, 0] == 0, 1], mixture[mixture[:, 0] == 1, 1]
    assert sorted(first.tolist()) == sorted(list(range(6)) * 2)
    assert len(second) == 5 and len(set(second.tolist())) == 5 and second.max() < 10
    np.testing.assert_array_equal(mixture, _mixture(sizes, weights, seed=0))
    assert not np.array_equal(mixture, _mixture(sizes, weights, seed=1))
    with pytest.raises(ConfigError, match="weight"):
        _mixture((3,), (0.1,), seed=0)


def test_dataset_mixes_sources_by_weight(assets) -> None:
    _, data, processor = assets
    dataset = make_dataset(processor, DatasetConfig(str(data), weight=2.0), DatasetConfig(str(data), weight=0.5))
    assert len(dataset) == 2 * NUM_ROWS + NUM_ROWS // 2
    assert (dataset.index[:, 0] == 0).sum() == 2 * NUM_ROWS


def test_lengths_put_videos_above_images(assets) -> None:
    _, data, processor = assets
    dataset = make_dataset(processor, data)
    lengths = dataset.lengths()
    assert len(lengths) == len(dataset)
    video = [row_id(dataset, p).startswith("v") for p in range(len(dataset))]
    assert min(n for n, v in zip(lengths, video) if v) > max(n for n, v in zip(lengths, video) if not v)
    assert min(lengths) >= processor.num_image_tokens


def test_corrupt_row_is_replaced_by_the_next_and_counted(assets, tmp_path: Path) -> None:
    _, data, processor = assets
    broken = shutil.copytree(data, tmp_path / "data")
    (broken / "images" / "0005.png").unlink()
    dataset = make_dataset(processor, broken)
    position = next(p for p in range(len(dataset)) if row_id(dataset, p) == "r5")
    item, following = dataset[position], dataset[(position + 1) % len(dataset)]
    assert item["num_corrupt_rows"] == 1 and following["num_corrupt_rows"] == 0
    torch.testing.assert_close(item["pixel_values"], following["pixel_values"])


def test_unreadable_first_rows_and_missing_path_are_config_errors(assets, tmp_path: Path) -> None:
    _, _, processor = assets
    images_only = write_squares_dataset(tmp_path / "images_only", num_rows=6)
    with pytest.raises(ConfigError, match=r"data\.datasets\.0") as error:
        make_dataset(processor, DatasetConfig(str(images_only), root=str(tmp_path)))
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ConfigError, match=r"data\.datasets\.0\.path"):
        make_dataset(processor, tmp_path / "nowhere")


def _fixed_query_lengths(processor: DamProcessor, frames: int, caption: str) -> tuple[int, int]:
    """(prompt, full) token counts of a row under the fixed query."""
    encoded = processor.encode(PromptAugmentation().fixed_query, frames, answer=caption)
    return encoded.labels.count(IGNORE_INDEX), len(encoded.input_ids)


def test_max_length_skips_rows_whose_prompt_does_not_fit(assets) -> None:
    _, data, processor = assets
    _, image_full = _fixed_query_lengths(processor, 1, "a yellow square .")
    assert _fixed_query_lengths(processor, 3, "a red square .")[0] > image_full
    dataset = make_dataset(processor, data, augmentation=PromptAugmentation(enabled=False), max_length=image_full)
    video = [row_id(dataset, p).startswith("v") for p in range(len(dataset))]
    for position in (p for p in range(len(dataset)) if video[p]):
        run = next(k for k in range(len(dataset)) if not video[(position + k) % len(dataset)])
        item = dataset[position]
        assert item["num_corrupt_rows"] == run and item["pixel_values"].shape[0] == 1
        assert item["labels"][-1] == processor.tokenizer.eos_token_id  # images are not cut


def test_max_length_cuts_the_answer_not_the_prompt(assets) -> None:
    _, data, processor = assets
    full = make_dataset(processor, data, augmentation=PromptAugmentation(enabled=False))
    position = next(p for p in range(len(full)) if row_id(full, p).startswith("r"))
    prompt, length = _fixed_query_lengths(processor, 1, "a red square .")
    cut = make_dataset(processor, data, augmentation=PromptAugmentation(enabled=False), max_length=prompt + 2)
    whole, item = full[position], cut[position]
    assert len(item["input_ids"]) == prompt + 2 < len(whole["input_ids"])
    assert item["input_ids"] == whole["input_ids"][: prompt + 2]
    assert item["labels"] == whole["labels"][: prompt + 2] and item["num_corrupt_rows"] == 0


def test_length_grouped_sampler_orders() -> None:
    n, lengths = 20, np.random.default_rng(0).integers(1, 100, 20).tolist()
    sampler = LengthGroupedSampler(lengths, n, batch_size=2, seed=7, mega_batch_factor=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        positions = [key - epoch * n for key in keys]
        assert sorted(positions) == list(range(n))
        assert keys == list(LengthGroupedSampler(lengths, n, 2, seed=7, mega_batch_factor=3).order(epoch) + epoch * n)
        for start in range(0, n, 6):
            group = [lengths[p] for p in positions[start : start + 6]]
            assert group == sorted(group, reverse=True)
        epochs.append(positions)
    assert epochs[0] != epochs[1] != epochs[2]
    plain = LengthGroupedSampler(None, n, batch_size=2, seed=7)
    assert sorted(plain.order(0).tolist()) == list(range(n)) and len(plain) == n
    assert plain.order(0).tolist() != LengthGroupedSampler(None, n, 2, seed=8).order(0).tolist()


def test_collator_padding_side_does_not_change_the_loss(assets) -> None:
    checkpoint, data, processor = assets
    dataset = make_dataset(processor, data)
    items = [dataset[p] for p in range(4)]
    for item, corrupt in zip(items, (1, 0, 2, 0)):
        item["num_corrupt_rows"] = corrupt
    torch.manual_seed(0)
    model = DamForConditionalGeneration.from_pretrained(checkpoint).eval()
    with torch.no_grad():  # non-zero gates, so the regional pass depends on the context
        for adapter in model.vision.adapters:
            adapter.attn_gate.fill_(0.7)
            adapter.mlp_gate.fill_(0.5)
    outputs = {}
    for side in ("right", "left"):
        batch = DamCollator(processor, side)(items)
        assert int(batch.pop("num_corrupt_rows")) == 3
        mask = batch["attention_mask"].bool()
        assert (batch["labels"][~mask] == IGNORE_INDEX).all()
        assert (batch["input_ids"][~mask] == processor.tokenizer.pad_token_id).all()
        for row, item in enumerate(items):
            assert batch["position_ids"][row][mask[row]].tolist() == list(range(len(item["input_ids"])))
            assert batch["input_ids"][row][mask[row]].tolist() == item["input_ids"]
        torch.testing.assert_close(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))
        assert batch["crop_is_full_image"].tolist() == [f for it in items for f in it["crop_is_full_image"].tolist()]
        with torch.no_grad():
            output = model(**batch)
        outputs[side] = (output.loss, [output.logits[row][mask[row]] for row in range(len(items))])
    torch.testing.assert_close(outputs["right"][0], outputs["left"][0])
    for right, left in zip(outputs["right"][1], outputs["left"][1]):
        torch.testing.assert_close(right, left, rtol=1e-4, atol=1e-5)
