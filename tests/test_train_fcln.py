"""`dam-train fcln`: the paper's VG preprocessing, the cached split, the two-optimizer schedule,
kill-and-resume, the predictions file and config errors. CPU, tiny sizes, generated data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.densecap import densecap_map, parse_predictions
from dam.configio import ConfigError, from_dict, read_yaml
from dam.fcln import FclnModel
from dam.fcln.vocabulary import UNK_ID
from dam.jsonio import read_json
from dam.visual_genome import load_region_descriptions
from data_pipeline.shapes_layouts import write_shapes_visual_genome
from train import fcln_data
from train.cli import main as dam_train
from train.fcln import (
    FclnOptimizers,
    build_model,
    evaluate_fcln,
    list_checkpoints,
    resume_checkpoint,
    run_fcln_training,
)
from train.fcln_config import FclnDataConfig, FclnTrainConfig, load_fcln_config
from train.fcln_data import (
    FclnImageDataset,
    IterationSampler,
    epoch_order,
    load_or_preprocess,
    preprocess,
    split_image_ids,
)

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPES = REPO / "configs" / "train" / "fcln" / "tiny_shapes.yaml"
ITERATIONS = 30  # 5 epochs of the 6 training images
SAVE_EVERY = 10
KILL_AT = 15  # the train_step call that "crashes": iteration 14, after checkpoint-10


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shapes_vg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 ShapesDLC scenes in VG's layout (images/{id}.png, region_descriptions.json, image_data.json)."""
    folder = tmp_path_factory.mktemp("shapes_vg")
    write_shapes_visual_genome(folder, 8, seed=0, progress=False)
    return folder


def shapes_config(data_dir: Path, output_dir: Path, *overrides: str) -> FclnTrainConfig:
    """The shipped tiny config on the 8 scenes: 6 train / 1 val / 1 test images, 128-pixel inputs."""
    return load_fcln_config(TINY_SHAPES, [
        f"data.region_descriptions={data_dir / 'region_descriptions.json'}",
        "data.num_val=1", "data.num_test=1", "data.min_word_count=1",
        "model.fcln.image_longer_side=128", "model.fcln.test_num_proposals=20",
        f"training.output_dir={output_dir}", f"training.max_iterations={ITERATIONS}",
        f"training.save_every={SAVE_EVERY}", "training.keep_checkpoints=null", "training.val_every=10",
        "training.val_images=1", "training.log_every=1", "training.progress=false",
        "optim.learning_rate=3e-3", "optim.cnn_learning_rate=3e-2",
        *overrides,
    ])


@pytest.fixture(scope="module")
def finished_run(shapes_vg: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FclnTrainConfig, Path]:
    """One uninterrupted run, shared by the tests that inspect its outputs."""
    torch.set_num_threads(1)
    config = shapes_config(shapes_vg, tmp_path_factory.mktemp("runs") / "uninterrupted")
    return config, run_fcln_training(config)


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train" / "fcln").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_fcln_configs_match_the_schema(path: Path) -> None:
    config = from_dict(FclnTrainConfig, read_yaml(path, "configs/train/fcln/")).validate()
    assert config.fcln_config(["a", "word"]).vocabulary[-2:] == ["a", "word"]


def test_paper_defaults() -> None:
    config = FclnTrainConfig(data=FclnDataConfig(region_descriptions="x.json")).validate()
    data, optim = config.data, config.optim
    assert (data.max_words, data.min_word_count, data.min_regions_per_image, data.max_regions_per_image) == (10, 15, 20, 50)
    assert (data.num_val, data.num_test) == (5000, 5000)
    assert optim.cnn_optimizer == "sgd" and optim.cnn_momentum == 0.9 and optim.cnn_frozen_epochs == 1.0
    assert config.fcln_config(["w"]).image_longer_side == 720


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rat=1", "unknown config key 'optim.learning_rat' (did you mean 'optim.learning_rate'?)"),
    ("model.fcln.rpn_batch=3", "unknown config key 'model.fcln.rpn_batch'"),
    ("model.fcln.vocabulary=[a]", "built from the training split"),
    ("model.fcln.backbone=vgg19", "backbone='vgg19' is not one of"),
    ("data.min_regions_per_image=9", "exceeds data.max_regions_per_image"),
])
def test_config_mistakes_are_one_line_errors_with_exit_status_2(override: str, message: str, capsys) -> None:
    assert dam_train(["fcln", "--config", str(TINY_SHAPES), "data.max_regions_per_image=5", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dam-train fcln: error: ") and message in err and err.count("\n") == 1


def test_dam_train_without_fcln_is_still_the_dam_trainer(capsys, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # its deepspeed path is relative to the repository
    assert dam_train(["--config", str(REPO / "configs/train/dam_3b_image.yaml"), "--print-config"]) == 0
    assert "freeze" in json.loads(capsys.readouterr().out)


# -- preprocessing -----------------------------------------------------------------------------------


def region(phrase: str, x: float, y: float, w: float, h: float) -> dict[str, Any]:
    return {"phrase": phrase, "x": x, "y": y, "width": w, "height": h}


@pytest.fixture
def handmade_vg(tmp_path: Path) -> Path:
    """Five 40x30 images whose regions exercise every preprocessing rule; image_data.json records
    each image at twice its file size (a frame the boxes are given in)."""
    ok = [region("a red car", 1, 1, 10, 10), region("the road", 5, 5, 20, 10)]
    entries = [
        {"id": 1, "regions": [region("A Red, car!", 1, 1, 10, 10), region("the road.", 2, 2, 30, 20),
                              region("one two three four five six seven eight nine ten eleven", 0, 0, 5, 5),
                              region("one two three four five six seven eight nine ten", 0, 0, 5, 5),
                              region("a rare word", 0, 0, 5, 5)]},
        {"id": 2, "regions": [*ok, region("a car off the edge", 70, 50, 40, 40), region("empty box", 90, 10, 5, 5),
                              region("...", 1, 1, 5, 5)]},
        {"id": 3, "regions": [*ok, region("a zebra", 1, 1, 5, 5)]},
        {"id": 4, "regions": [*ok, region("a zebra", 1, 1, 5, 5)]},
        {"id": 5, "regions": [region("alone", 1, 1, 5, 5)]},  # too few regions
        {"id": 6, "regions": [*ok, *ok, *ok]},  # too many regions
    ]
    (tmp_path / "images").mkdir()
    for entry in entries:
        Image.fromarray(np.full((30, 40, 3), 100, dtype=np.uint8)).save(tmp_path / "images" / f"{entry['id']}.png")
    (tmp_path / "region_descriptions.json").write_text(json.dumps(entries))
    sizes = [{"image_id": e["id"], "width": 80, "height": 60} for e in entries]
    (tmp_path / "image_data.json").write_text(json.dumps(sizes))
    (tmp_path / "splits.json").write_text(json.dumps({"train": [1, 2], "val": [3], "test": [4, 5, 99]}))
    return tmp_path


def handmade_config(folder: Path, **changes: Any) -> FclnDataConfig:
    settings = dict(region_descriptions=str(folder / "region_descriptions.json"), split_file=str(folder / "splits.json"),
                    min_word_count=2, min_regions_per_image=2, max_regions_per_image=5, num_workers=0)
    return FclnDataConfig(**{**settings, **changes})


def test_preprocessing_follows_the_paper(handmade_vg: Path) -> None:
    data = preprocess(handmade_config(handmade_vg), progress=False)
    stats = data.stats
    assert stats["regions_too_long"] == 1 and stats["regions_empty_phrase"] == 1 and stats["regions_empty_box"] == 1
    assert stats["images_too_few_regions"] == 1 and stats["images_too_many_regions"] == 1
    train, test = data.splits["train"], data.splits["test"]
    assert train.image_ids == [1, 2] and data.splits["val"].image_ids == [3] and test.image_ids == [4]
    assert train.phrases is None and test.phrases == ["a red car", "the road", "a zebra"]
    # the ten-word phrase is kept, the eleven-word one dropped; punctuation and case are gone
    assert int(train.offsets[1]) == 4  # image 1: red car, road, ten words, rare word
    words = set(data.vocabulary)
    assert {"a", "red", "car", "the", "road"} <= words
    assert "rare" not in words  # seen once in train, min_word_count=2
    assert "zebra" not in words  # seen twice, but only in val and test
    assert "edge" not in words and "eleven" not in words
    rare_caption = train.captions[3].tolist()
    assert rare_caption[:3] == [data.vocabulary.index("a"), UNK_ID, UNK_ID]
    # a box reaching out of the 80x60 frame is clipped to it
    image2 = train.boxes[train.regions(1)].tolist()
    assert [70.0, 50.0, 80.0, 60.0] in image2


def test_boxes_are_scaled_from_their_frame_to_the_network_input(handmade_vg: Path) -> None:
    from dam.fcln import FclnImageProcessor

    data = preprocess(handmade_config(handmade_vg), progress=False)
    example = FclnImageDataset(data.splits["train"], FclnImageProcessor(longer_side=20))[0]
    assert tuple(example.pixels.shape) == (3, 15, 20)  # the 40x30 file at longer side 20
    assert example.scale == (0.25, 0.25)  # 20 input pixels per 80 pixels of image_data.json's frame
    torch.testing.assert_close(example.boxes[0], torch.tensor([1.0, 1.0, 11.0, 11.0]) * 0.25)


def test_shuffled_split_is_deterministic_and_seeded() -> None:
    config = FclnDataConfig(region_descriptions="x", num_val=5, num_test=5, split_seed=3)
    ids = list(range(100, 150))
    first = split_image_ids(ids, config)
    assert first == split_image_ids(list(reversed(ids)), config)  # the file's order does not matter
    assert sorted(first["train"] + first["val"] + first["test"]) == ids
    assert (len(first["train"]), len(first["val"]), len(first["test"])) == (40, 5, 5)
    other = split_image_ids(ids, FclnDataConfig(region_descriptions="x", num_val=5, num_test=5, split_seed=4))
    assert other["test"] != first["test"]
    assert len(split_image_ids(ids, FclnDataConfig(region_descriptions="x", num_val=5, num_test=5, num_train=7))["train"]) == 7
    with pytest.raises(ConfigError, match="leaves no training image"):
        split_image_ids(ids[:10], config)


def test_the_preprocessed_split_is_cached_and_reused(handmade_vg: Path, tmp_path: Path, monkeypatch) -> None:
    config = handmade_config(handmade_vg)
    first = load_or_preprocess(config, tmp_path / "run", progress=False)
    cache = tmp_path / "run" / "preprocessed"
    assert read_json(cache / "vocabulary.json", "vocabulary") == first.vocabulary
    assert read_json(cache / "stats.json", "stats") == first.stats
    assert not list(cache.glob(".*.tmp"))  # written through a temporary file, renamed into place

    def no_preprocessing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(fcln_data, "preprocess", no_preprocessing)
    again = load_or_preprocess(config, tmp_path / "run", progress=False)
    assert again.vocabulary == first.vocabulary and again.splits["test"].phrases == first.splits["test"].phrases
    torch.testing.assert_close(again.splits["train"].captions, first.splits["train"].captions)
    changed = handmade_config(handmade_vg, min_word_count=1)
    with pytest.raises(ConfigError, match="other data settings"):  # resuming needs the run's own data
        load_or_preprocess(changed, tmp_path / "run", must_match=True, progress=False)
    monkeypatch.undo()
    rebuilt = load_or_preprocess(changed, tmp_path / "run", progress=False)  # a fresh run preprocesses again
    assert "rare" in rebuilt.vocabulary


def test_iteration_sampler_resumes_the_same_order() -> None:
    full = list(IterationSampler(6, seed=1, start=0, stop=20))
    assert sorted(full[:6]) == list(range(6)) and sorted(full[6:12]) == list(range(6))
    assert full[:6] == epoch_order(6, 1, 0).tolist() and full[:6] != full[6:12]
    assert list(IterationSampler(6, seed=1, start=9, stop=20)) == full[9:]


# -- training ----------------------------------------------------------------------------------------


def logged(run_dir: Path) -> list[dict[str, float]]:
    return read_json(run_dir / "loss_history.json", "loss history")["loss_history"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_tiny_run_lowers_the_loss(finished_run) -> None:
    _, final = finished_run
    history = logged(final.parent)
    assert [entry["iteration"] for entry in history] == list(range(ITERATIONS))
    first, last = (np.mean([e["loss"] for e in part]) for part in (history[:6], history[-6:]))
    assert last < 0.8 * first, (first, last)
    validation = read_json(final.parent / "loss_history.json", "loss history")["val_history"]
    assert [entry["iteration"] for entry in validation] == [10, 20, 30]
    assert validation[-1]["loss"] < validation[0]["loss"]
    model = FclnModel.from_pretrained(final)
    assert model.config.vocabulary == json.loads((final.parent / "preprocessed" / "vocabulary.json").read_text())


def test_the_cnn_is_frozen_for_the_first_epoch_then_trained_by_sgd(finished_run) -> None:
    config, final = finished_run
    run_dir = final.parent
    data = load_or_preprocess(config.data, run_dir, progress=False)
    initial = build_model(config, data.vocabulary)  # same seed: the run's starting weights
    optimizers = FclnOptimizers(initial, config)
    assert type(optimizers.heads) is torch.optim.Adam and type(optimizers.cnn) is torch.optim.SGD
    assert optimizers.cnn.defaults["momentum"] == 0.9
    cnn_names = {name for name, p in initial.named_parameters() if any(p is q for q in optimizers.cnn_params)}
    assert cnn_names and all(name.startswith("backbone.") for name in cnn_names)
    assert not {id(p) for p in optimizers.cnn_params} & {id(p) for p in optimizers.head_params}

    start = {name: p.detach() for name, p in initial.state_dict().items()}
    # 6 training images: the CNN is frozen for iterations 0-5 and trained from iteration 6 on
    after_ten = weights(run_dir / "checkpoint-10")
    short = shapes_config(Path(config.data.region_descriptions).parent, run_dir.parent / "one_epoch",
                          "training.max_iterations=6", "evaluation.after_training=false")
    after_epoch_one = weights(run_fcln_training(short))
    for name in cnn_names:
        torch.testing.assert_close(after_epoch_one[name], start[name], rtol=0, atol=0)
        assert not torch.equal(after_ten[name], start[name]), name  # trained after the first epoch
    assert not torch.equal(after_epoch_one["localization.conv.weight"], start["localization.conv.weight"])
    cnn_state = torch.load(run_dir / "checkpoint-10" / "training_state.pt", weights_only=True)["optimizers"]["cnn"]
    assert all("momentum_buffer" in s for s in cnn_state["state"].values()) and len(cnn_state["state"]) == len(cnn_names)
    frozen_state = torch.load(run_dir.parent / "one_epoch" / "checkpoint-6" / "training_state.pt", weights_only=True)
    assert frozen_state["optimizers"]["cnn"]["state"] == {}  # SGD never stepped in epoch 1


def test_kill_and_resume_reproduces_the_uninterrupted_run(finished_run, monkeypatch) -> None:
    """A run killed between checkpoints and resumed ends with bit-identical weights and the same
    loss history (no iteration repeated or lost): the data order is a function of the iteration,
    and the checkpoint restores both optimizers and the RNG that box sampling draws from."""
    import train.fcln as trainer

    config, final = finished_run
    killed_dir = final.parent.parent / "killed"
    config = shapes_config(Path(config.data.region_descriptions).parent, killed_dir)
    real_step, calls = trainer.train_step, []

    def crashing_step(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == KILL_AT:
            raise KeyboardInterrupt  # as a kill between checkpoints would
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_fcln_training(config)
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert [n for n, _ in list_checkpoints(killed_dir)] == [10]
    with pytest.raises(ConfigError, match="pass --resume"):
        run_fcln_training(config)
    resumed = run_fcln_training(config, resume=True)

    expected, got = weights(final), weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert logged(killed_dir) == logged(final.parent)
    assert [n for n, _ in list_checkpoints(killed_dir)] == [10, 20, 30]


def test_resume_choices(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert resume_checkpoint(run, False) is None and resume_checkpoint(run, "auto") is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resume_checkpoint(run, True)
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "training_state.pt").write_bytes(b"")
    (run / "checkpoint-9").mkdir()  # a folder without its state is not a checkpoint
    (run / ".checkpoint-12.partial").mkdir()  # what a kill during a save leaves
    assert resume_checkpoint(run, "auto") == run / "checkpoint-5"
    assert resume_checkpoint(run, True) == run / "checkpoint-5"
    with pytest.raises(ConfigError, match="not a complete FCLN checkpoint"):
        resume_checkpoint(run, str(run / "checkpoint-9"))


def test_predictions_are_valid_for_the_densecap_benchmark(finished_run, capsys) -> None:
    config, final = finished_run
    eval_dir = final.parent / "eval"
    gt = load_region_descriptions(eval_dir / "test_region_descriptions.json")
    predictions = read_json(eval_dir / "final_test_predictions.json", "predictions")
    detections = parse_predictions(predictions, {str(i): i for i in gt})
    assert detections and {d.image_id for d in detections} == set(gt)
    assert all(0 <= d.box[0] <= d.box[2] <= 512 and 0 <= d.box[1] <= d.box[3] <= 512 for d in detections)
    result = densecap_map(gt, predictions, meteor=lambda candidates, references: [1.0] * len(candidates))
    assert 0.0 <= result.map <= 1.0 and result.num_images == 1

    # --eval-only captions the split again with a chosen model, here a checkpoint
    argv = ["fcln", "--config", str(TINY_SHAPES), "--eval-only", "--model", str(final.parent / "checkpoint-20"),
            *[f"{k}={v}" for k, v in (("data.region_descriptions", config.data.region_descriptions),
                                      ("data.num_val", 1), ("data.num_test", 1), ("data.min_word_count", 1),
                                      ("training.output_dir", final.parent), ("training.progress", "false"))]]
    assert dam_train(argv) == 0
    written = read_json(eval_dir / "checkpoint-20_test_predictions.json", "predictions")
    assert parse_predictions(written, {str(i): i for i in gt})


def test_evaluation_checkpoints_each_image_and_resumes(finished_run, shapes_vg, tmp_path, monkeypatch) -> None:
    _, final = finished_run
    config = shapes_config(shapes_vg, tmp_path / "eval", "data.num_test=3")
    reference = evaluate_fcln(config, final)  # uninterrupted
    expected = read_json(reference.predictions, "predictions")
    assert reference.num_images == 3 and not list((tmp_path / "eval" / "eval").glob(".*.partial"))

    reference.predictions.unlink()
    calls = []
    generate = FclnModel.generate

    def crashing_generate(self, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while captioning the third image
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(FclnModel, "generate", crashing_generate)
    with pytest.raises(KeyboardInterrupt):
        evaluate_fcln(config, final)
    (partial,) = (tmp_path / "eval" / "eval").glob(".*.partial")
    assert len(list(partial.glob("chunk-*.json"))) == 2 and not reference.predictions.exists()

    calls.clear()
    resumed = evaluate_fcln(config, final)
    assert len(calls) == 1  # only the image the kill interrupted
    assert read_json(resumed.predictions, "predictions") == expected and not partial.exists()
