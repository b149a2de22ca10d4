"""Text queries against regions: log P(query | region) from a captioner, as DenseCap §4.2 did.

The score of a (region, query) pair is the captioner's log-probability of generating the
query from the region, teacher-forced, summed over the query's tokens *including the end
token*: FCLN's <end>, and DAM's EOS (or whatever end-of-turn marker the chat template closes
the answer with: the tokens `DamProcessor.encode(query, 1, answer)` labels for training). The
end token counts because "a dog" and "a dog on a sofa" should not score alike when the region
shows only a dog. FCLN words outside the vocabulary score as <unk>; queries are not truncated.

Both scorers batch over (region, query) pairs and share the per-region work:
- FCLN: the LSTM's state after [region code, <start>] is computed once per region; the pairs
  then run the query words (right-padded) from copies of that state.
- DAM: the vision pass and the prompt (image tokens + instruction) run once per region with a
  KV cache; the pairs run only their answer tokens (right-padded) on copies of that cache. The
  prompt is hundreds of tokens and a query about ten, so this is most of the saving.
Padded positions are masked out of the sums. Log-softmax is taken in float32 (logsumexp and a
gather, never a (pairs, tokens, vocabulary) log-probability tensor).

With the (region, query) scores, `QueryScores` ranks images by the mean over a query set of
each query's best-region score, and gives each query's best box (retrieval and open-world
detection: `score_queries`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from dam.densecap.captioners import fcln_region_codes, region_masks
from dam.densecap.regions import Regions
from dam.errors import DamInputError

if TYPE_CHECKING:
    from dam.describe import DescribeAnything
    from dam.densecap.proposers import Proposer
    from dam.fcln import FclnModel, FclnVocabulary
    from dam.fcln.language_model import FclnLanguageModel
    from dam.sam import SamPrompter

logger = logging.getLogger(__name__)


LOGIT_BUDGET = 1 << 26
"""Most logits (elements) held in float32 at once: 256 MiB. With a 128k-token vocabulary a full
(pairs, tokens, vocabulary) float32 copy would take gigabytes, so rows are converted in chunks."""


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32, for logits (..., V) and targets (...)."""
    vocab = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
    rows = max(1, LOGIT_BUDGET // vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows].float()  # (rows, V)
        picked = chunk.gather(-1, flat_targets[start : start + rows, None]).squeeze(-1)
        out[start : start + rows] = picked - torch.logsumexp(chunk, dim=-1)
    return out.view(targets.shape)


def _accepts(module: torch.nn.Module, argument: str) -> bool:
    """Whether `module.forward` takes `argument` (transformers renamed some between versions)."""
    return argument in inspect.signature(module.forward).parameters


# ---- FCLN ----------------------------------------------------------------------------------


def fcln_query_token_ids(vocabulary: "FclnVocabulary", queries: Sequence[str]) -> list[list[int]]:
    """Word ids of each query followed by <end> (what the FCLN's LSTM is scored on)."""
    from dam.fcln.vocabulary import END_ID

    return [vocabulary.encode(query) + [END_ID] for query in queries]


@torch.no_grad()
def fcln_query_logprobs(language_model: "FclnLanguageModel", vocabulary: "FclnVocabulary", codes: torch.Tensor,
                        queries: Sequence[str], pair_batch_size: int = 4096) -> torch.Tensor:
    """(R, Q) float32 log P(query + <end> | region code) for codes (R, D); the LSTM must be in eval mode."""
    from dam.fcln.vocabulary import END_ID, PAD_ID, START_ID

    if pair_batch_size < 1:
        raise DamInputError(f"pair_batch_size={pair_batch_size} must be at least 1")
    num_regions, num_queries = codes.shape[0], len(queries)
    out = torch.zeros(num_regions, num_queries, dtype=torch.float32)
    if num_regions == 0 or num_queries == 0:
        return out
    device = codes.device
    lm = language_model
    targets_list = fcln_query_token_ids(vocabulary, queries)
    width = max(len(t) for t in targets_list)
    targets = torch.full((num_queries, width), PAD_ID, dtype=torch.long, device=device)  # (Q, T)
    for row, ids in enumerate(targets_list):
        targets[row, : len(ids)] = torch.tensor(ids, device=device)
    valid = targets != PAD_ID  # (Q, T)
    # Inputs after <start>: the words, i.e. the targets without their last token (<end>).
    inputs = targets[:, :-1].masked_fill(targets[:, :-1] == END_ID, PAD_ID)  # (Q, T-1)

    # Per region: the state after the code and <start>, and the output that predicts word 0.
    start = torch.full((num_regions, 1), START_ID, dtype=torch.long, device=device)
    prefix = torch.cat((lm.encode_regions(codes)[:, None], lm.embedding(start)), dim=1)  # (R, 2, E)
    hidden, (h, c) = lm.lstm(prefix)
    first_logits = lm.output(hidden[:, -1])  # (R, V): predicts each query's first token
    out += torch.log_softmax(first_logits.float(), dim=-1)[:, targets[:, 0]].cpu()  # (R, Q)
    if width == 1:
        return out
    embedded = lm.embedding(inputs)  # (Q, T-1, E)
    # The output layer makes (pairs, T-1, V) logits: the pair blocks stay within the logit budget.
    pairs = max(1, min(pair_batch_size, LOGIT_BUDGET // ((width - 1) * lm.output.out_features)))
    region_block = max(1, pairs // num_queries)
    query_block = min(num_queries, pairs)
    for r0 in range(0, num_regions, region_block):
        r1 = min(num_regions, r0 + region_block)
        for q0 in range(0, num_queries, query_block):
            q1 = min(num_queries, q0 + query_block)
            nr, nq = r1 - r0, q1 - q0
            state = tuple(s[:, r0:r1].repeat_interleave(nq, dim=1) for s in (h, c))  # (layers, nr*nq, H)
            words = embedded[q0:q1].repeat(nr, 1, 1)  # (nr*nq, T-1, E), region-major
            steps, _ = lm.lstm(words, state)  # (nr*nq, T-1, H)
            logprobs = _token_logprobs(lm.output(steps), targets[q0:q1, 1:].repeat(nr, 1))  # (nr*nq, T-1)
            logprobs = logprobs.masked_fill(~valid[q0:q1, 1:].repeat(nr, 1), 0.0).sum(-1)
            out[r0:r1, q0:q1] += logprobs.view(nr, nq).cpu()
    return out


# ---- DAM -----------------------------------------------------------------------------------


def dam_answer_token_ids(describer: "DescribeAnything", queries: Sequence[str], prompt_query: str | None = None
                         ) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids for one image frame and each query's answer ids (end token included),
    exactly as `DamProcessor.encode(prompt_query, 1, answer=query)` splits a training example."""
    processor = describer.processor
    prompt = processor.prompt_ids(prompt_query, 1)
    answers = []
    for query in queries:
        encoded = processor.encode(prompt_query, 1, answer=query)
        if encoded.input_ids[: len(prompt)] != prompt:
            raise DamInputError(
                f"the prompt tokenises differently with the answer {query!r} appended; this model's template "
                "cannot be scored by prefix caching"
            )
        answers.append(encoded.input_ids[len(prompt) :])
    return prompt, answers


@torch.no_grad()
def dam_query_logprobs(describer: "DescribeAnything", regions: Sequence[tuple[np.ndarray, np.ndarray]],
                       queries: Sequence[str], *, region_batch_size: int = 8, pair_batch_size: int = 64,
                       prompt_query: str | None = None) -> torch.Tensor:
    """(R, Q) float32 log P(query + end token | region) under a DAM, for (image, mask) regions.

    The prompt (`prompt_query`, default: the model's default query) runs once per block of
    `region_batch_size` regions with a KV cache; about `pair_batch_size` (region, query) pairs
    (at least one query for every region of the block) then run their answers together on
    copies of it (see the module docstring).
    """
    if region_batch_size < 1 or pair_batch_size < 1:
        raise DamInputError("region_batch_size and pair_batch_size must be at least 1")
    model = describer.model
    processor = describer.processor
    lm = model.language_model
    device = describer.device
    num_regions, num_queries = len(regions), len(queries)
    out = torch.zeros(num_regions, num_queries, dtype=torch.float32)
    if num_regions == 0 or num_queries == 0:
        return out
    _, answers = dam_answer_token_ids(describer, queries, prompt_query)
    if any(len(a) == 0 for a in answers):
        raise DamInputError("a query tokenises to no tokens; give non-empty query text")
    pad_id = describer.tokenizer.pad_token_id
    width = max(len(a) for a in answers)
    answer_ids = torch.full((num_queries, width), pad_id, dtype=torch.long)  # (Q, T) right-padded
    answer_mask = torch.zeros((num_queries, width), dtype=torch.long)
    for row, ids in enumerate(answers):
        answer_ids[row, : len(ids)] = torch.tensor(ids)
        answer_mask[row, : len(ids)] = 1
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    vision_dtype = model.vision.mask_patch_embedding.weight.dtype
    keep_last = _accepts(lm, "logits_to_keep")

    for r0 in range(0, num_regions, region_batch_size):
        block = regions[r0 : r0 + region_batch_size]
        nr = len(block)
        batch = processor([[region] for region in block], [prompt_query] * nr)  # left-padded prompts
        prompt_mask = batch["attention_mask"].to(device)  # (nr, Lp)
        embeds = model.embed_inputs(
            batch["input_ids"].to(device), batch["pixel_values"].to(device, vision_dtype),
            batch["crop_is_full_image"].to(device),
        )  # (nr, Lp, D)
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last prompt position's logits are needed (it predicts the first answer token).
        keep = {"logits_to_keep": 1} if keep_last else {}
        prefix = lm(inputs_embeds=embeds, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True,
                    **keep)
        first = torch.log_softmax(prefix.logits[:, -1].float(), dim=-1)[:, answer_ids[:, 0]]  # (nr, Q)
        out[r0 : r0 + nr] += first.cpu()
        if width == 1:
            continue
        prompt_lengths = prompt_mask.sum(-1)  # (nr,)
        query_block = max(1, pair_batch_size // nr)
        for q0 in range(0, num_queries, query_block):
            q1 = min(num_queries, q0 + query_block)
            nq = q1 - q0
            pair_region = torch.arange(nr, device=device).repeat_interleave(nq)  # region-major pairs
            cache = copy.deepcopy(prefix.past_key_values)
            cache.reorder_cache(pair_region)  # (nr*nq) rows, each its region's prompt
            ids = answer_ids[q0:q1].repeat(nr, 1)  # (P, T)
            mask = answer_mask[q0:q1].repeat(nr, 1)
            positions = prompt_lengths[pair_region, None] + torch.arange(width, device=device)[None]  # (P, T)
            result = lm(
                inputs_embeds=model.get_input_embeddings()(ids),
                attention_mask=torch.cat((prompt_mask[pair_region], mask), dim=1),
                position_ids=positions, past_key_values=cache, use_cache=True,
            )
            # Output t predicts answer token t + 1; the padded tail is masked out of the sum.
            logprobs = _token_logprobs(result.logits[:, :-1], ids[:, 1:]).masked_fill(mask[:, 1:] == 0, 0.0)
            out[r0 : r0 + nr, q0:q1] += logprobs.sum(-1).view(nr, nq).cpu()
    return out


# ---- scorers -------------------------------------------------------------------------------


class QueryScorer(Protocol):
    """Scores every (region, query) pair of each image: log P(query | region)."""

    name: str

    def score(self, images: Sequence[np.ndarray], regions: Sequence[Regions], queries: Sequence[str]
              ) -> list[np.ndarray]:
        """(R_i, Q) float32 log-probabilities per image."""
        ...


class FclnQueryScorer:
    """Scores with an FCLN's LSTM (module docstring); codes as `FclnCaptioner` computes them."""

    name = "fcln"

    def __init__(self, model: "FclnModel", pair_batch_size: int = 4096) -> None:
        self.model = model.eval()
        self.pair_batch_size = pair_batch_size

    def score(self, images: Sequence[np.ndarray], regions: Sequence[Regions], queries: Sequence[str]
              ) -> list[np.ndarray]:
        codes = fcln_region_codes(self.model, images, regions)
        if not any(c.shape[0] for c in codes):
            return [np.zeros((0, len(queries)), dtype=np.float32) for _ in regions]
        scores = fcln_query_logprobs(self.model.language_model, self.model.vocabulary, torch.cat(codes),
                                     queries, self.pair_batch_size).numpy()
        return list(np.split(scores, np.cumsum([c.shape[0] for c in codes])[:-1]))


class DamQueryScorer:
    """Scores with a DAM's LLM (module docstring); masks as `DamCaptioner` builds them."""

    name = "dam"

    def __init__(self, describer: "DescribeAnything", sam: "SamPrompter | None" = None, *,
                 region_batch_size: int = 8, pair_batch_size: int = 64, prompt_query: str | None = None) -> None:
        self.describer = describer
        self.sam = sam
        self.region_batch_size = region_batch_size
        self.pair_batch_size = pair_batch_size
        self.prompt_query = prompt_query

    def score(self, images: Sequence[np.ndarray], regions: Sequence[Regions], queries: Sequence[str]
              ) -> list[np.ndarray]:
        items: list[tuple[np.ndarray, np.ndarray]] = []
        for image, image_regions in zip(images, regions):
            items.extend((image, mask) for mask in region_masks(image, image_regions, self.sam)[0])
        scores = dam_query_logprobs(self.describer, items, queries, region_batch_size=self.region_batch_size,
                                    pair_batch_size=self.pair_batch_size, prompt_query=self.prompt_query).numpy()
        return list(np.split(scores, np.cumsum([len(r) for r in regions])[:-1]))


# ---- retrieval and localisation ------------------------------------------------------------


@dataclass
class QueryHit:
    """One region's score for a query."""

    image: str
    region: int
    box: list[float]
    logprob: float

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "region": self.region, "box": self.box, "logprob": self.logprob}


@dataclass
class QueryScores:
    """Each image's best region for each query (from `score_queries`)."""

    images: list[str]
    queries: list[str]
    best_logprob: np.ndarray
    """(I, Q) max over the image's regions of log P(query | region); -inf for an image without regions."""
    best_region: np.ndarray
    """(I, Q) index of that region; -1 where none."""
    boxes: list[np.ndarray] = field(repr=False)
    """Per image (R_i, 4) boxes of its regions."""
    num_pairs: int = 0
    """(region, query) pairs scored."""
    seconds: float = 0.0
    """Time spent proposing and scoring."""

    def best_box(self, image: int, query: int) -> np.ndarray | None:
        region = int(self.best_region[image, query])
        return None if region < 0 else self.boxes[image][region]

    def image_scores(self, query_indices: Sequence[int]) -> np.ndarray:
        """(I,) mean over the given queries of each image's best-region log-probability (DenseCap's
        retrieval score for a query set)."""
        return self.best_logprob[:, list(query_indices)].mean(axis=1)

    def rank_images(self, query_indices: Sequence[int]) -> np.ndarray:
        """Image indices, best first, for a query set (ties keep image order)."""
        return np.argsort(-self.image_scores(query_indices), kind="stable")

    hits: list[list[QueryHit]] = field(default_factory=list, repr=False)
    """Per query, the best regions over all images, best first (as many as `keep_hits` asked)."""

    def top_hits(self, query: int, k: int) -> list[QueryHit]:
        """The `k` best (image, region) pairs for a query over all images: open-world detection.

        Every region competes, not only each image's best, so an image may hold several hits.
        """
        return self.hits[query][:k]


def score_queries(images: Iterable[tuple[str, np.ndarray]], queries: Sequence[str], proposer: "Proposer",
                  scorer: QueryScorer, *, max_regions: int = 30, image_batch_size: int = 8,
                  keep_hits: int = 100, progress: bool = True,
                  regions_for: Any = None, num_images: int | None = None) -> QueryScores:
    """Propose regions in every image, score every (region, query) pair and keep, per query, each
    image's best region and the `keep_hits` best regions overall.

    `images` yields (key, uint8 (H, W, 3)) pairs and is read `image_batch_size` at a time, so a
    thousand images need not be in memory at once. `regions_for(key)`, when given, returns
    already known regions of an image (or None to propose them). `num_images` is the progress
    bar's total when `images` is an iterator (a sized `images` gives its own).
    """
    queries = list(queries)
    if not queries:
        raise DamInputError("no query given; pass at least one query text")
    if image_batch_size < 1:
        raise DamInputError(f"image_batch_size={image_batch_size} must be at least 1")
    keys: list[str] = []
    best_rows: list[np.ndarray] = []
    region_rows: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    hits: list[list[QueryHit]] = [[] for _ in queries]
    num_pairs = 0
    start = time.perf_counter()

    def flush(batch: list[tuple[str, np.ndarray]]) -> None:
        nonlocal num_pairs
        batch_keys = [key for key, _ in batch]
        pixels = [image for _, image in batch]
        known = [regions_for(key) if regions_for is not None else None for key in batch_keys]
        todo = [i for i, r in enumerate(known) if r is None]
        if todo:
            proposed = proposer.propose([pixels[i] for i in todo], max_regions, [batch_keys[i] for i in todo])
            for i, r in zip(todo, proposed):
                known[i] = r
        regions = [r.head(max_regions) for r in known]  # type: ignore[union-attr]
        for key, image_regions, scores in zip(batch_keys, regions, scorer.score(pixels, regions, queries)):
            num_pairs += scores.size
            keys.append(key)
            boxes.append(image_regions.boxes)
            if scores.shape[0] == 0:
                best_rows.append(np.full(len(queries), -np.inf))
                region_rows.append(np.full(len(queries), -1))
                continue
            best_rows.append(scores.max(axis=0))
            region_rows.append(scores.argmax(axis=0))
            for q in range(len(queries) if keep_hits > 0 else 0):
                # Keep the running top `keep_hits` per query; merging per image keeps it cheap.
                order = np.argsort(-scores[:, q], kind="stable")[:keep_hits]
                hits[q].extend(QueryHit(key, int(r), [float(v) for v in image_regions.boxes[r]], float(scores[r, q]))
                               for r in order)
                hits[q].sort(key=lambda hit: -hit.logprob)
                del hits[q][keep_hits:]

    batch: list[tuple[str, np.ndarray]] = []
    total = num_images if num_images is not None else len(images) if isinstance(images, Sized) else None
    with tqdm(total=total, desc="score queries", unit="img", disable=not progress) as bar:
        for item in images:
            batch.append(item)
            if len(batch) == image_batch_size:
                flush(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            flush(batch)
            bar.update(len(batch))
    elapsed = time.perf_counter() - start
    if not keys:
        raise DamInputError("no images to search; give at least one image")
    logger.info("scored %d (region, query) pairs in %.1f s (%.0f pairs/s, proposals included)",
                num_pairs, elapsed, num_pairs / max(elapsed, 1e-9))
    return QueryScores(keys, queries, np.stack(best_rows), np.stack(region_rows), boxes, num_pairs, elapsed, hits)
