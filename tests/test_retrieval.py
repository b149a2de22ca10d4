"""bench.retrieval: DenseCap §4.2 image retrieval and localisation by text, and its speed mode.

The meaningful check runs on ShapesDLC scenes in VG layout, whose captions name one object
unambiguously, with the built-in ShapesDLC DAM as the scorer and the ground-truth boxes as the
proposals (`--proposer gt`): with an oracle's boxes, the test isolates what this module adds
(scoring every region against every query, ranking images by the mean of each caption's best
region, picking the best box) from the quality of a proposer, and the built-in DAM reads these
captions well enough that the source image must come first. An FCLN proposer would make the
test depend on a trained FCLN (a random one proposes arbitrary boxes); the FCLN path is run end
to end with a tiny random FCLN for the plumbing and the speed mode.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.cli import main as dam_bench
from bench.densecap import iou_matrix
from bench.retrieval import (
    QuerySet,
    evaluate_retrieval,
    retrieval_metrics,
    sample_protocol,
    scoring_speed,
)
from dam import DescribeAnything
from dam.densecap import DamQueryScorer, FclnQueryScorer, QueryScores, Regions
from dam.errors import DamInputError
from dam.visual_genome import load_region_descriptions
from data_pipeline.shapes_layouts import write_shapes_visual_genome
from tests.factories import tiny_shapes_fcln


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shapes_vg(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_vg")
    write_shapes_visual_genome(root, 12, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def builtin() -> DescribeAnything:
    return DescribeAnything.from_pretrained()


def test_sampling_follows_the_protocol(shapes_vg):
    gt = load_region_descriptions(shapes_vg / "region_descriptions.json")
    images, queries = sample_protocol(gt, 10, 5, 3, seed=1)
    assert len(images) == 10 and len(set(images)) == 10 and set(images) <= set(gt)
    assert len(queries) == 5 and len({q.image_id for q in queries}) == 5
    for query in queries:
        assert query.image_id in images and len(set(query.captions)) == 3
        phrases = {(r.phrase, r.box) for r in gt[query.image_id]}
        assert all((c, b) in phrases for c, b in zip(query.captions, query.boxes))
    assert sample_protocol(gt, 10, 5, 3, seed=1) == (images, queries)  # deterministic
    with pytest.raises(DamInputError, match="distinct captions"):
        sample_protocol(gt, 10, 5, 9)


def test_metrics_rank_ties_against_the_source_and_measure_iou():
    boxes = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float), np.array([[0, 0, 10, 10]], float), np.zeros((0, 4))]
    scores = QueryScores(
        images=["a", "b", "c"], queries=["q0", "q1"],
        best_logprob=np.array([[-1.0, -5.0], [-1.0, -2.0], [-np.inf, -np.inf]]),
        best_region=np.array([[1, 0], [0, 0], [-1, -1]]), boxes=boxes,
    )
    sets = [QuerySet("A", ("q0",), ((20, 20, 40, 30),)), QuerySet("B", ("q0", "q1"), ((0, 0, 10, 10), (5, 0, 15, 10)))]
    recall, median_rank, iou_at, median_iou, ranks, ious = retrieval_metrics(scores, sets, {"A": "a", "B": "b"})
    # Set 1: "a" ties with "b" on q0 and ties count against the source: rank 2. Set 2: "b" scores
    # (-1 - 2) / 2 = -1.5 against "a"'s -3 and "c"'s -inf (no regions): rank 1.
    assert ranks == [2, 1]
    assert recall == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0} and median_rank == 1.5
    np.testing.assert_allclose(ious, [0.5, 1.0, 1 / 3])
    assert iou_at == {"IoU@0.1": 1.0, "IoU@0.3": 1.0, "IoU@0.5": 2 / 3}
    assert median_iou == pytest.approx(0.5)


def test_builtin_dam_ranks_the_source_image_first(shapes_vg, builtin):
    gt = load_region_descriptions(shapes_vg / "region_descriptions.json")
    result, query_sets, scores = evaluate_retrieval(
        gt, shapes_vg / "images", "gt", DamQueryScorer(builtin), num_images=10, num_queries=6,
        captions_per_query=3, seed=0, progress=False,
    )
    assert result.num_images == 10 and result.num_queries == 6 and result.num_captions == 18
    assert result.ranks == [1] * 6 and result.recall["R@1"] == 1.0 and result.median_rank == 1
    # With the ground-truth boxes as proposals, the best box of a caption is mostly its own box.
    assert result.iou_at["IoU@0.5"] >= 0.8 and result.median_iou == 1.0
    assert scores.num_pairs == sum(len(gt[i]) for i in gt if str(i) in scores.images) * len(scores.queries)


class PhraseBoxScorer:
    """Scores a region by its best IoU with a ground-truth box of the query's phrase: an ideal
    captioner, so that localisation can only fail when the query's own box is not a proposal."""

    name = "phrase-box"

    def __init__(self, gt):
        self.boxes: dict[str, list] = {}
        for regions in gt.values():
            for region in regions:
                self.boxes.setdefault(region.phrase.strip(), []).append(region.box)

    def score(self, images, regions, queries):
        return [
            np.stack([iou_matrix(r.boxes, self.boxes[q]).max(axis=1) for q in queries], axis=1).reshape(len(r), -1)
            for r in regions
        ]


def test_gt_proposer_keeps_every_ground_truth_region(shapes_vg):
    gt = load_region_descriptions(shapes_vg / "region_descriptions.json")
    assert max(len(regions) for regions in gt.values()) > 1
    result, _, scores = evaluate_retrieval(
        gt, shapes_vg / "images", "gt", PhraseBoxScorer(gt), num_images=10, num_queries=6, captions_per_query=3,
        max_regions=1, progress=False,
    )
    counts = {str(image_id): len(regions) for image_id, regions in gt.items()}
    assert [len(boxes) for boxes in scores.boxes] == [counts[key] for key in scores.images]
    assert result.iou_at["IoU@0.5"] == 1.0 and result.median_iou == 1.0


def test_cli_with_a_tiny_fcln_end_to_end(shapes_vg, tmp_path, capsys):
    fcln_dir = tmp_path / "fcln"
    tiny_shapes_fcln().save_pretrained(fcln_dir)
    out = tmp_path / "retrieval.json"
    args = ["--gt", str(shapes_vg / "region_descriptions.json"), "--images", str(shapes_vg / "images"),
            "--model", "fcln", str(fcln_dir), "--num-images", "8", "--num-queries", "4", "--captions-per-query", "3",
            "--max-regions", "5", "--device", "cpu"]
    assert dam_bench(["retrieval", *args, "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["recall"]) == {"R@1", "R@5", "R@10"} and set(printed["iou_at"]) == {"IoU@0.1", "IoU@0.3", "IoU@0.5"}
    assert 1 <= printed["median_rank"] <= 8 and printed["num_captions"] == 12
    stored = json.loads(out.read_text())
    assert len(stored["ranks"]) == 4 and len(stored["query_sets"]) == 4 and stored["settings"]["proposer"] == "fcln"
    assert dam_bench(["retrieval", *args, "--proposer", "sam"]) == 2
    assert "--sam-checkpoint" in capsys.readouterr().err


def test_speed_mode_prints_batched_and_single_pair_rates(shapes_vg, tmp_path, capsys):
    """The CPU smoke run of `dam-bench retrieval --speed` at tiny size."""
    args = ["--gt", str(shapes_vg / "region_descriptions.json"), "--images", str(shapes_vg / "images"),
            "--model", "dam", "builtin", "--proposer", "gt", "--speed", "--speed-images", "2",
            "--speed-queries", "2", "--captions-per-query", "3", "--speed-baseline-pairs", "6", "--device", "cpu"]
    assert dam_bench(["retrieval", *args]) == 0
    printed = capsys.readouterr().out
    assert "pairs/s" in printed and "ratio (batched / one at a time)" in printed


def test_scoring_speed_agrees_between_batched_and_single_pairs(builtin):
    from dam.shapes import scene

    scenes = [scene(5, i) for i in range(2)]
    images = [s.image for s in scenes]
    regions = [Regions(np.array([o.box for o in s.objects], float), np.ones(len(s.objects))) for s in scenes]
    queries = [o.caption for o in scenes[0].objects[:3]]
    for scorer in (DamQueryScorer(builtin, region_batch_size=4, pair_batch_size=8), FclnQueryScorer(tiny_shapes_fcln())):
        speed = scoring_speed(scorer, images, regions, queries, baseline_pairs=5)
        assert speed["pairs"] == sum(len(r) for r in regions) * 3 and speed["single_pairs"] == 5
        assert speed["batched_pairs_per_s"] > 0 and speed["single_pairs_per_s"] > 0
        assert speed["max_abs_difference"] < 1e-3
