"""Dense captioning applications on FCLN and DAM: folders of images, a viewer, text queries.

DenseCap (Johnson et al., 2016) ran its model over folders of images, drew the regions and
captions into pictures, served them in a web viewer, and used the region captioner for image
retrieval and open-world detection (§4.2): a text query is localised by the probability of
generating it from each region. This package does all of it with FCLN or SAM proposals and
FCLN or DAM captions.

    from dam import DescribeAnything
    from dam.fcln import FclnModel
    from dam.densecap import DamCaptioner, DenseCaptioner, FclnProposer, run_folder
    dense = DenseCaptioner(FclnProposer(FclnModel.from_pretrained("runs/fcln/final")),
                           DamCaptioner(DescribeAnything.from_pretrained()))
    results = dense(["photo.jpg"])                 # boxes, scores, captions per image
    run_folder(dense, "photos/", "out/")           # JSON + drawn images + out/index.html; resumable

Command line: `dam densecap` (dam.densecap.cli). Retrieval benchmark: `dam-bench retrieval`.
CPU smoke run: tests/test_densecap_app.py (tiny models, seconds).
"""

from dam.densecap.captioners import Captioner, DamCaptioner, FclnCaptioner, fcln_region_codes, region_masks
from dam.densecap.drawing import draw_dense_captions
from dam.densecap.files import InputImage, find_images
from dam.densecap.proposers import FclnProposer, FixedProposer, Proposer, SamProposer
from dam.densecap.regions import Regions, box_to_mask, mask_to_box
from dam.densecap.runner import DenseCaptioner, DenseCaptions, RunStats, run_folder, search_folder
from dam.densecap.scoring import (
    DamQueryScorer,
    FclnQueryScorer,
    QueryHit,
    QueryScorer,
    QueryScores,
    dam_query_logprobs,
    fcln_query_logprobs,
    score_queries,
)
from dam.densecap.viewer import write_viewer

__all__ = [
    "Captioner",
    "DamCaptioner",
    "DamQueryScorer",
    "DenseCaptioner",
    "DenseCaptions",
    "FclnCaptioner",
    "FclnProposer",
    "FclnQueryScorer",
    "FixedProposer",
    "InputImage",
    "Proposer",
    "QueryHit",
    "QueryScorer",
    "QueryScores",
    "Regions",
    "RunStats",
    "SamProposer",
    "box_to_mask",
    "dam_query_logprobs",
    "draw_dense_captions",
    "fcln_query_logprobs",
    "fcln_region_codes",
    "find_images",
    "mask_to_box",
    "region_masks",
    "run_folder",
    "score_queries",
    "search_folder",
    "write_viewer",
]
