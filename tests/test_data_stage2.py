"""DLC-SDP stage 2 (SA-1B self-labeling): tiny random OWLv2 / SAM / Mask2Former / SigLIP, real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")
torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from PIL import Image  # noqa: E402

from tests.sdp_fixtures import DeterministicLabeler, InterruptingLabeler, make_sa1b, rgb, write_json  # noqa: E402

from dam.configio import ConfigError  # noqa: E402
from dam.errors import DamInputError  # noqa: E402
from dam.schema import decode_row, load_dataset_dir  # noqa: E402
from data_pipeline.config import (  # noqa: E402
    DetectorConfig, OutputConfig, PartialConfig, RejectionConfig, SamConfig, SelectionConfig, SiglipConfig, SourceConfig,
    Stage2Config,
)
from data_pipeline.detection import BoxSegmenter, Detections, OwlDetector  # noqa: E402
from data_pipeline.rejection import InstanceSegmenter, SiglipScorer  # noqa: E402
from data_pipeline.stage2 import Stage2Models, run_stage2  # noqa: E402

VOCAB = ["dog", "cat", "car", "tree"]
H, W = 48, 64


# ---- tiny models, saved to folders and loaded by the pipeline's own loaders -------------------


def _tokenizer():
    """A word-level tokenizer ending every text with </s>, given the highest id: CLIP-style text towers
    (OWLv2) pool at the argmax of the ids, which is where real CLIP tokenizers put their end token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tests.factories import WORDS

    words = ["<pad>", "<s>", "<unk>", *dict.fromkeys([*WORDS, "photo", "thing", "with", "surface", "marks", "near", "its", "edges"])]
    vocab = {word: index for index, word in enumerate([*words, "</s>"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def save_tiny_owlv2(path: Path) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = _tokenizer()
    layers = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, max_position_embeddings=16, bos_token_id=1,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=0, **layers),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, **layers), projection_dim=32,
    )
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():  # a random box head saturates the sigmoid; without it each box is its patch's (the box bias)
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(path)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_mask2former(path: Path, seed: int = 0) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    config = Mask2FormerConfig(
        backbone_config=SwinConfig(image_size=32, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_dim=32, feature_size=32, mask_feature_size=32, num_queries=5, encoder_layers=1, decoder_layers=2,
        dim_feedforward=32, encoder_feedforward_dim=32, num_attention_heads=2, common_stride=4, num_labels=3,
        id2label={0: "person", 1: "dog", 2: "wall"}, label2id={"person": 0, "dog": 1, "wall": 2},
    )
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}, size_divisor=32).save_pretrained(path)
    return path


def save_tiny_siglip(path: Path) -> Path:
    from transformers import SiglipConfig as HfSiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = _tokenizer()
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = HfSiglipConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, **layers),
                            vision_config=dict(image_size=32, patch_size=8, **layers))
    torch.manual_seed(0)
    SiglipModel(config).eval().save_pretrained(path)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(path)
    return path


def tiny_sam(seed: int = 0):
    from tests.test_sam import tiny_sam as build

    return build(seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: intra-op threads cost more in synchronisation than they save (40x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage2_models")
    return {"owl": save_tiny_owlv2(root / "owl"), "m2f": save_tiny_mask2former(root / "m2f"), "siglip": save_tiny_siglip(root / "siglip")}


# ---- data --------------------------------------------------------------------------------------


def make_images(root: Path) -> Path:
    """sa_1 (30x40) + sa_4..sa_7 (48x64): usable; sa_2 truncated JSON, sa_3 missing image, sa_8 corrupt JPEG."""
    make_sa1b(root)
    for i in (4, 5, 6, 7, 8):
        pixels = rgb(H, W, 10 + i)
        pixels[8:30, 10:40] = (200, 40 * i % 255, 30)  # an object-like block
        if i == 8:
            (root / f"sa_{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
        else:
            Image.fromarray(pixels).save(root / f"sa_{i}.jpg", quality=95)
        write_json(root / f"sa_{i}.json", {"image": {"image_id": i, "width": W, "height": H, "file_name": f"sa_{i}.jpg"},
                                           "annotations": [{"id": 1, "segmentation": {"size": [H, W], "counts": "!!bad"}}]})
    return root


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "sa1b")


def permissive(model_paths: dict[str, Path], images: Path, out: Path, **sections) -> Stage2Config:
    """Every threshold off or at its floor: what comes out depends on the selection rule only."""
    config = Stage2Config(
        source=SourceConfig(type="sa1b", images=str(images)),
        detector=DetectorConfig(path=str(model_paths["owl"]), vocabulary=list(VOCAB), min_score=0.0, nms_iou=0.5, max_detections=6),
        sam=SamConfig(batch_size=4),
        partial=PartialConfig(path=str(model_paths["m2f"]), threshold=0.0, min_inside=1.0),
        siglip=SiglipConfig(path=str(model_paths["siglip"]), batch_size=3),
        rejection=RejectionConfig(min_detector_score=None, min_sam_iou=None, min_mask_area=1, max_mask_fraction=None, min_siglip_score=None),
        selection=SelectionConfig(max_per_image=2, shortlist=4),
        output=OutputConfig(dir=str(out), shard_size=2),
        seed=1, batch_size=2, device="cpu",
    )
    for name, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, name), key, value)
    return config


def load_models(config: Stage2Config, sam_seed: int = 0) -> Stage2Models:
    return Stage2Models(
        detector=OwlDetector.from_config(config.detector, "cpu"),
        segmenter=BoxSegmenter(tiny_sam(sam_seed), batch_size=config.sam.batch_size),
        instances=InstanceSegmenter.from_config(config.partial, "cpu") if config.partial.path else None,
        siglip=SiglipScorer.from_config(config.siglip, "cpu") if config.siglip.path else None,
    )


def rows_of(out: Path, tmp_path: Path) -> list[dict]:
    return sorted(load_dataset_dir(out, cache_dir=tmp_path / "hf-cache"), key=lambda r: r["id"])


def per_image(rows: list[dict]) -> dict[str, list[dict]]:
    images: dict[str, list[dict]] = {}
    for row in rows:
        images.setdefault(row["id"].rsplit("/", 1)[0], []).append(row)
    return images


def assert_funnel(tally: dict) -> None:
    """kept(previous filter) == kept(next) + rejected(next), from the detector on."""
    names = list(tally["filters"])
    for before, after in zip(names, names[1:]):
        counts = tally["filters"]
        assert counts[before]["kept"] == counts[after]["kept"] + sum(counts[after]["rejected"].values()), (before, after)


class Spy:
    """Records what the real models returned during a run (the scores the thresholds act on)."""

    def __init__(self, models: Stage2Models, monkeypatch) -> None:
        self.detector: list[float] = []
        self.found: list[int] = []  # per image: boxes after NMS, before max_detections
        self.sam: list[float] = []
        self.areas: list[int] = []  # non-empty masks only (empty ones are "empty_mask", not "too_small")
        self.fractions: list[float] = []  # mask area / image area
        self.siglip: list[float] = []
        detect, segment, scores = models.detector.detect, models.segmenter.segment, models.siglip.scores

        def spy_detect(image):
            found = detect(image)
            self.detector.extend(found.scores.tolist())
            self.found.append(len(found) + found.over_cap)
            return found

        def spy_segment(image, boxes):
            masks, ious = segment(image, boxes)
            self.sam.extend(ious.tolist())
            areas = [int(np.count_nonzero(mask)) for mask in masks]
            self.areas.extend(area for area in areas if area)
            self.fractions.extend(area / (image.shape[0] * image.shape[1]) for area in areas)
            return masks, ious

        def spy_scores(crops, texts):
            out = scores(crops, texts)
            self.siglip.extend(out.tolist())
            return out

        monkeypatch.setattr(models.detector, "detect", spy_detect)
        monkeypatch.setattr(models.segmenter, "segment", spy_segment)
        monkeypatch.setattr(models.siglip, "scores", spy_scores)


# ---- end to end with the real (tiny) models ----------------------------------------------------


def test_rows_load_as_training_data_and_follow_the_two_per_image_rule(model_paths, images, tmp_path):
    out = tmp_path / "out"
    config = permissive(model_paths, images, out, selection={"max_mask_overlap": 1.0})
    labeler = DeterministicLabeler()
    summary = run_stage2(config, labeler=labeler, models=load_models(config), progress=False)
    rows = rows_of(out, tmp_path)
    assert rows and summary.rows == len(rows)
    for row in rows:
        assert row["source"] == "sa1b" and row["category"] in VOCAB and row["image"]["path"].startswith("sa_")
        decoded = decode_row(row, root=images)  # what dam-train reads
        assert decoded.masks[0].shape == decoded.frames[0].shape[:2] and decoded.masks[0].any()
        assert row["caption"].startswith(f"A {row['category']} ({row['id']},")
    groups = per_image(rows)
    assert all(len(group) <= 2 and len({r["category"] for r in group}) == len(group) for group in groups.values())
    assert any(len(group) == 2 for group in groups.values())
    assert {r.region_id for r in labeler.requests} >= {r["id"] for r in rows}
    tally = summary.tally.to_json()
    assert tally["units"] == {"seen": 8, "skipped": {"corrupt_image": 1, "corrupt_json": 1, "missing_image": 1}}
    assert list(tally["filters"]) == ["detector", "mask", "partial", "shortlist", "labeler", "per_image"]
    assert_funnel(tally)
    assert tally["filters"]["per_image"]["kept"] == len(rows)
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "stage2" and run["image_root"] == str(images) and run["config"]["detector"]["vocabulary"] == VOCAB
    from data_pipeline.merge import merge_datasets
    from data_pipeline.stats import dataset_stats

    merge_datasets([out], tmp_path / "merged", progress=False)  # stage-2 folders merge like stage-1 ones
    stats = dataset_stats(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "manifest.json").read_text())["image_root"] == str(images)
    assert stats["rows"] == len(rows)


@pytest.mark.parametrize("filter_name, key, reason", [
    ("detector_score", "min_detector_score", "low_detector_score"),
    ("sam_iou", "min_sam_iou", "low_sam_iou"),
    ("siglip", "min_siglip_score", "low_siglip_score"),
    ("mask", "min_mask_area", "too_small"),
    ("mask", "max_mask_fraction", "too_large"),
])
def test_each_threshold_removes_rows_and_counts_them(model_paths, images, tmp_path, monkeypatch, filter_name, key, reason):
    # No spares (shortlist == max_per_image) and no overlap rule, so every candidate a threshold removes is a row lost.
    exact = {"selection": {"shortlist": 2, "max_mask_overlap": 1.0}}
    config = permissive(model_paths, images, tmp_path / "base", **exact)
    models = load_models(config)
    spy = Spy(models, monkeypatch)
    base = run_stage2(config, labeler=DeterministicLabeler(), models=models, progress=False)
    observed = {"min_detector_score": spy.detector, "min_sam_iou": spy.sam, "min_siglip_score": spy.siglip,
                "min_mask_area": spy.areas, "max_mask_fraction": spy.fractions}[key]
    assert base.rows > 1 and len(set(observed)) > 1
    others = {k: v for k, v in base.tally.to_json()["filters"].get(filter_name, {"rejected": {}})["rejected"].items() if k != reason}
    values = sorted(set(observed))
    if key == "max_mask_fraction":  # an upper bound: between observed values, so float rounding of area vs fraction cannot matter
        thresholds = [(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2, (values[0] + values[1]) / 2]
    else:
        thresholds = [float(np.median(observed)), max(observed)]
    for threshold in thresholds:
        out = tmp_path / f"t{threshold}"
        config = permissive(model_paths, images, out, **exact, rejection={key: threshold})
        summary = run_stage2(config, labeler=DeterministicLabeler(), models=load_models(config), progress=False)
        tally = summary.tally.to_json()
        hit = sum(value > threshold if key == "max_mask_fraction" else value < threshold for value in observed)
        assert tally["filters"][filter_name]["rejected"] == {**others, reason: hit} and hit > 0
        assert summary.rows <= base.rows
        assert_funnel(tally)
    assert summary.rows < base.rows  # only the best candidate(s) reach the rows


def overlapping_boxes(models: Stage2Models) -> Stage2Models:
    """The tiny OWLv2 with its boxes grown past their patches, so that neighbours overlap and NMS has work."""
    with torch.no_grad():
        models.detector.model.box_head.dense2.bias[2:] = 1.5  # logits of width and height
    return models


@pytest.mark.parametrize("key, value", [("min_score", "median"), ("nms_iou", 0.1), ("max_detections", 2)])
def test_detector_thresholds_change_the_candidates(model_paths, images, tmp_path, monkeypatch, key, value):
    exact = {"selection": {"shortlist": 2, "max_mask_overlap": 1.0}}
    config = permissive(model_paths, images, tmp_path / "base", **exact, detector={"max_detections": 100})
    models = overlapping_boxes(load_models(config))
    spy = Spy(models, monkeypatch)
    base = run_stage2(config, labeler=DeterministicLabeler(), models=models, progress=False)
    found = base.tally.to_json()["filters"]["detector"]
    assert found["rejected"] == {} and found["kept"] == len(spy.detector) == sum(spy.found)
    threshold = float(np.median(spy.detector)) if value == "median" else value
    config = permissive(model_paths, images, tmp_path / "t", **exact, detector={"max_detections": 100, key: threshold})
    summary = run_stage2(config, labeler=DeterministicLabeler(), models=overlapping_boxes(load_models(config)), progress=False)
    tally = summary.tally.to_json()
    detector = tally["filters"]["detector"]
    if key == "min_score":  # NMS suppresses only by better boxes, which pass too: the boxes scoring >= the threshold remain
        assert detector == {"kept": sum(score >= threshold for score in spy.detector), "rejected": {}}
    elif key == "nms_iou":
        assert detector["rejected"] == {} and 0 < detector["kept"] < found["kept"]
    else:  # the best max_detections per image are kept, the others counted
        assert detector == {"kept": sum(min(n, 2) for n in spy.found), "rejected": {"over_max_detections": sum(max(0, n - 2) for n in spy.found)}}
    assert 0 < detector["kept"] < found["kept"] and summary.rows <= base.rows
    assert_funnel(tally)


def test_partial_masks_are_dropped_and_counted(model_paths, images, tmp_path):
    config = permissive(model_paths, images, tmp_path / "out", partial={"min_inside": 0.0, "match_iou": 1.0})
    models = load_models(config)
    summary = run_stage2(config, labeler=DeterministicLabeler(), models=models, progress=False)
    partial = summary.tally.to_json()["filters"]["partial"]
    # match_iou 1 (nothing is whole) and min_inside 0: every mask touching an instance is "a part" of it.
    assert partial["rejected"].get("partial", 0) > 0
    instances = models.instances.instances(rgb(H, W, 3))
    assert instances.masks.dtype == bool and instances.masks.shape[1:] == (H, W)
    assert len(instances.labels) == len(instances) and set(instances.labels) <= {"person", "dog", "wall"}
    dropped = permissive(model_paths, images, tmp_path / "drop", partial={"min_inside": 1.0, "match_iou": 1.0, "unmatched": "drop"})
    tally = run_stage2(dropped, labeler=DeterministicLabeler(), models=load_models(dropped), progress=False).tally.to_json()
    assert tally["filters"]["partial"]["kept"] == 0 and tally["rows"] == 0  # nothing whole: all partial or unmatched


def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(model_paths, images, tmp_path):
    reference = tmp_path / "reference"
    config = permissive(model_paths, images, reference, selection={"max_mask_overlap": 1.0})
    run_stage2(config, labeler=DeterministicLabeler(), models=load_models(config), progress=False)
    out = tmp_path / "out"
    config = permissive(model_paths, images, out, selection={"max_mask_overlap": 1.0})
    with pytest.raises(KeyboardInterrupt):  # killed while labeling the 3rd image (shard 1 of 4)
        run_stage2(config, labeler=InterruptingLabeler(after=2), models=load_models(config), progress=False)
    assert sorted(p.name for p in out.glob("*.report.json")) == ["shard-00000.report.json"]
    assert not list(out.glob(".*.tmp"))
    labeler = DeterministicLabeler()
    summary = run_stage2(config, labeler=labeler, models=load_models(config), progress=False)
    assert summary.shards_skipped == [0] and summary.shards_written == [1, 2, 3]
    expected = [(r["id"], r["caption"], r["mask"]["counts"]) for r in rows_of(reference, tmp_path)]
    assert [(r["id"], r["caption"], r["mask"]["counts"]) for r in rows_of(out, tmp_path)] == expected
    again = permissive(model_paths, images, out, selection={"max_mask_overlap": 1.0}, sam={"batch_size": 1}, siglip={"batch_size": 1})
    assert run_stage2(again, labeler=DeterministicLabeler(), models=load_models(again), progress=False).shards_written == []
    changed = permissive(model_paths, images, out, selection={"max_mask_overlap": 1.0}, rejection={"min_detector_score": 0.5})
    with pytest.raises(DamInputError, match=r"another config \(config\.rejection\.min_detector_score=None \(now 0\.5\)\)"):
        run_stage2(changed, labeler=DeterministicLabeler(), models=load_models(changed), progress=False)


# ---- the selection rule, on controlled candidates ---------------------------------------------


class FakeDetector:
    vocabulary = ["dog", "cat", "car", "tree", "bird", "person"]

    def __init__(self, found: list[tuple[str, float, tuple[int, int, int, int]]]) -> None:
        self.found = found

    def detect(self, image: np.ndarray) -> Detections:
        return Detections(
            boxes=np.array([box for _, _, box in self.found], np.float32), scores=np.array([s for _, s, _ in self.found], np.float32),
            labels=np.array([self.vocabulary.index(c) for c, _, _ in self.found]), categories=[c for c, _, _ in self.found],
        )


class BoxMasks:
    """SAM stand-in: each box's mask is the box, predicted IoU 1."""

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks = np.zeros((len(boxes), *image.shape[:2]), bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
            mask[y0:y1, x0:x1] = True
        return masks, np.ones(len(boxes), np.float32)


class SiglipByIndex:
    def __init__(self, scores: dict[int, float]) -> None:
        self.by_index = scores

    def scores(self, crops: list[np.ndarray], texts: list[str]) -> np.ndarray:
        return np.array([self.by_index[int(text.split("/det")[1].split(",")[0])] for text in texts], np.float32)


def one_image(root: Path) -> Path:
    root.mkdir(parents=True)
    Image.fromarray(rgb(H, W, 1)).save(root / "sa_1.jpg")
    write_json(root / "sa_1.json", {"image": {"image_id": 1, "width": W, "height": H, "file_name": "sa_1.jpg"}, "annotations": []})
    return root


def test_selection_keeps_the_best_two_of_different_classes_and_counts_the_rest(tmp_path):
    found = [
        ("dog", 0.9, (0, 0, 20, 20)), ("dog", 0.8, (40, 0, 60, 20)), ("cat", 0.7, (1, 1, 20, 20)), ("car", 0.6, (0, 28, 20, 48)),
        ("tree", 0.5, (40, 28, 60, 48)), ("bird", 0.45, (22, 0, 38, 16)), ("person", 0.4, (22, 30, 38, 48)),
    ]
    images = one_image(tmp_path / "sa1b")
    config = Stage2Config(
        source=SourceConfig(type="sa1b", images=str(images)), detector=DetectorConfig(vocabulary=FakeDetector.vocabulary),
        siglip=SiglipConfig(path="fake"), rejection=RejectionConfig(min_mask_area=1, min_siglip_score=0.05),
        selection=SelectionConfig(max_per_image=2, shortlist=4, max_mask_overlap=0.5), output=OutputConfig(dir=str(tmp_path / "out")),
    )
    models = Stage2Models(FakeDetector(found), BoxMasks(), None, SiglipByIndex({0: 0.1, 4: 0.9, 5: 0.5}))  # type: ignore[arg-type]
    labeler = DeterministicLabeler(refuse=["sa1b/1/det3"])
    summary = run_stage2(config, labeler=labeler, models=models, progress=False)
    # prescore = detector score (IoU 1): det0 dog; det1 same class; det2 is det0's object as "cat"; det3, det4, det5
    # fill the shortlist of 4, det6 is left out. det3 is refused; by prescore x SigLIP: det4 .45, det5 .225, det0 .09.
    assert [r.region_id for r in labeler.requests] == ["sa1b/1/det0", "sa1b/1/det3", "sa1b/1/det4", "sa1b/1/det5"]
    rows = load_dataset_dir(tmp_path / "out", cache_dir=tmp_path / "hf")
    assert [(r["id"], r["category"]) for r in rows] == [("sa1b/1/det4", "tree"), ("sa1b/1/det5", "bird")]
    np.testing.assert_array_equal(decode_row(rows[0], root=images).masks[0], BoxMasks().segment(np.zeros((H, W, 3)), np.array([[40, 28, 60, 48]]))[0][0])
    assert summary.tally.to_json()["filters"] == {
        "detector": {"kept": 7, "rejected": {}},
        "detector_score": {"kept": 7, "rejected": {}},
        "sam_iou": {"kept": 7, "rejected": {}},
        "mask": {"kept": 7, "rejected": {}},
        "shortlist": {"kept": 4, "rejected": {"over_shortlist": 1, "overlap": 1, "same_class": 1}},
        "labeler": {"kept": 3, "rejected": {"refusal": 1}},
        "siglip": {"kept": 3, "rejected": {}},
        "per_image": {"kept": 2, "rejected": {"over_cap": 1}},
    }


def test_detector_boxes_are_in_image_pixels_despite_the_square_padding(model_paths):
    detector = OwlDetector.from_config(DetectorConfig(path=str(model_paths["owl"]), vocabulary=VOCAB, min_score=0.0, nms_iou=1.0), "cpu")
    found = detector.detect(rgb(H, W, 3))
    # The zeroed box head leaves each patch's own box: 16 px squares centred on the 4x4 grid of the padded 64x64
    # square (OWLv2 pads bottom/right), clipped to the 48x64 image; the bottom row falls outside and is dropped.
    expected = sorted((max(cx - 8, 0), max(cy - 8, 0), min(cx + 8, W), min(cy + 8, H)) for cx in (16, 32, 48, 64) for cy in (16, 32, 48))
    assert np.allclose(sorted(map(tuple, found.boxes.tolist())), expected, atol=0.1)
    assert list(found.scores) == sorted(found.scores, reverse=True) and set(found.categories) <= set(VOCAB)
    assert detector.query_embeds().shape == (len(VOCAB), 32)


def test_vocabulary_file_and_errors(tmp_path):
    from data_pipeline.detection import load_vocabulary

    path = tmp_path / "classes.txt"
    path.write_text("# LVIS-style names\ndog\n\nteddy_bear  # a comment\ncat\n", encoding="utf-8")
    assert load_vocabulary(str(path)) == ["dog", "teddy_bear", "cat"]
    with pytest.raises(ConfigError, match="more than once"):
        load_vocabulary(["dog", "cat", "dog"])
    with pytest.raises(ConfigError, match="is not a file"):
        load_vocabulary(str(tmp_path / "absent.txt"))
    with pytest.raises(ConfigError, match="is required"):
        load_vocabulary(None)


def test_judge_mask_whole_partial_unmatched():
    from data_pipeline.rejection import judge_mask

    dog = np.zeros((40, 40), bool)
    dog[5:35, 5:35] = True  # 900 px
    person = np.zeros((40, 40), bool)
    person[0:10, 30:40] = True
    instances = np.stack([dog, person])
    head = np.zeros_like(dog)
    head[5:15, 5:15] = True  # inside the dog, 1/9 of it
    assert judge_mask(dog, instances).verdict == "whole"
    judgement = judge_mask(head, instances)
    assert (judgement.verdict, judgement.instance, judgement.inside) == ("partial", 0, 1.0) and judgement.iou == pytest.approx(100 / 900)
    background = np.zeros_like(dog)
    background[36:40, 0:20] = True
    assert judge_mask(background, instances).verdict == "unmatched"
    both = dog | person  # spans two objects: mostly the dog, but not inside it enough
    assert judge_mask(both, instances, match_iou=0.95, min_inside=0.95).verdict == "unmatched"
    assert judge_mask(head, instances[:0]).verdict == "unmatched"


def test_instance_model_leaves_out_ignored_classes(model_paths):
    every = InstanceSegmenter.from_config(PartialConfig(path=str(model_paths["m2f"]), threshold=0.0), "cpu")
    image = rgb(H, W, 5)
    assert every.binary_maps and len(every.instances(image)) > 0
    # The random model finds "person" and "dog" instances here (a panoptic model would list "wall", "sky", ...).
    no_dogs = InstanceSegmenter.from_config(PartialConfig(path=str(model_paths["m2f"]), threshold=0.0, ignore_labels=["dog"]), "cpu")
    assert 0 < len(no_dogs.instances(image)) < len(every.instances(image))
    assert "dog" in every.instances(image).labels and "dog" not in no_dogs.instances(image).labels
    with pytest.raises(ConfigError, match=r"partial\.ignore_labels: \['sky'\] are not classes"):
        InstanceSegmenter.from_config(PartialConfig(path=str(model_paths["m2f"]), ignore_labels=["sky"]), "cpu")


def test_placeholder_labeler_captions_by_category():
    from data_pipeline.labelers import LabelRequest, build_labeler

    labeler = build_labeler({"type": "placeholder", "caption": "A {category} here.", "render_views": True})
    mask = np.zeros((H, W), bool)
    mask[4:9, 4:9] = True
    requests = [LabelRequest("a", rgb(H, W, 1), mask, "teddy_bear", 0), LabelRequest("b", rgb(H, W, 1), mask, None, 0),
                LabelRequest("c", rgb(H, W, 1), np.zeros_like(mask), "dog", 0)]
    results = labeler.label(requests)
    assert [r.caption for r in results] == ["A teddy bear here.", "A object here.", None]
    assert results[2].reason == "error: empty mask"
    with pytest.raises(ConfigError, match=r"only field is \{category\}"):
        build_labeler({"type": "placeholder", "caption": "A {thing}."})


# ---- config and CLI ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_every_data_config_loads_by_its_stage():
    from data_pipeline.config import VideoStageConfig, load_data_config
    from data_pipeline.labelers import labeler_config
    from data_pipeline.labelers.video import video_labeler_config

    kinds = {}
    for path in sorted((REPO / "configs/data").glob("*.yaml")):
        config = load_data_config(path)
        kinds[path.name] = type(config).__name__
        (video_labeler_config if isinstance(config, VideoStageConfig) else labeler_config)(config.labeler)
    assert kinds["stage2_sa1b.yaml"] == "Stage2Config" and kinds["video_sav.yaml"] == "VideoStageConfig"
    assert kinds["stage1_coco.yaml"] == "Stage1Config"


def _cli(model_paths, images, out, sam, *extra):
    from data_pipeline.cli import main

    return main([
        "stage2", "--config", str(REPO / "configs/data/stage2_sa1b.yaml"), "--no-progress", f"source.images={images}",
        f"output.dir={out}", f"detector.path={model_paths['owl']}", "detector.vocabulary=[dog, cat, car, tree]",
        "detector.min_score=0.0", f"sam.checkpoint={sam}", f"partial.path={model_paths['m2f']}", "partial.threshold=0.0", "partial.min_inside=1.0",
        f"siglip.path={model_paths['siglip']}", "labeler={type: placeholder}", "device=cpu", "dtype=float32",
        "rejection={min_detector_score: null, min_sam_iou: null, min_mask_area: 1, max_mask_fraction: null, min_siglip_score: null}",
        "output.shard_size=3", *extra,
    ])


def test_cli_dry_run_with_the_placeholder_labeler(model_paths, images, tmp_path, monkeypatch, capsys):
    from data_pipeline import stage2

    sam = tmp_path / "sam_vit_h.pth"
    sam.write_bytes(b"weights")  # only its presence is checked: the tiny SAM comes from load_models
    monkeypatch.setattr(stage2.Stage2Models, "from_config", classmethod(lambda cls, config: load_models(config)))
    assert _cli(model_paths, images, tmp_path / "out", sam) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("stage2: ") and " rows from 8 units in 3 of 3 shards (worker 0/1; 0 complete before)" in line
    rows = rows_of(tmp_path / "out", tmp_path)
    assert rows and all(r["caption"] == f"A placeholder description of the {r['category']}, written by no model at all." for r in rows)
    assert _cli(model_paths, images, tmp_path / "out", sam) == 0
    assert "3 complete before" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["siglip.path=null", "rejection.min_siglip_score=0.1"], "rejection.min_siglip_score needs siglip.path"),
    (["sam.checkpoint=/no/such.pth"], "sam.checkpoint: '/no/such.pth' is not a file"),
    (["detector.path=/no/owl"], "detector.path: '/no/owl' is not a local transformers model folder"),
    (["selection.shortlist=1"], "selection.shortlist (1) must be >= selection.max_per_image (2)"),
    (["detector.min_scor=0.2"], "unknown config key 'detector.min_scor' (did you mean 'detector.min_score'?)"),
    (["source.type=sav"], "source.type 'sav' is a video source"),
    (["labeler={type: gpt}"], "set labeler.type to one of openai, transformers, dam, placeholder"),
])
def test_cli_config_errors_are_one_line(model_paths, images, tmp_path, capsys, extra, message):
    sam = tmp_path / "sam.pth"
    sam.write_bytes(b"x")
    assert _cli(model_paths, images, tmp_path / "out", sam, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dam-data: error: ") and message in err
