"""Prompts that ask a VLM labeler for a detailed description of one highlighted region.

Stage 1 of the data pipeline shows a VLM two views of a region (the focal crop and the full image
with the region highlighted, see :mod:`data_pipeline.views`) and one of several phrasings of the
same request; varying the phrasing keeps the labels from all sharing one VLM's answer template.
The dataset's category name goes into the prompt ("the highlighted dog") because a mask alone is
often ambiguous (the shirt or the person wearing it?), as the DAM paper's pipeline does.

Which phrasing a region gets depends only on its seed (``variant_order``), so a rerun or another
shard layout asks every region the same question. Templates are ``str.format`` strings with
three fields: ``{object}`` ("the highlighted dog", or "the highlighted object" without a
category), ``{category}`` (the bare name, or "object") and ``{views}`` (the sentence saying what
the two images show, from :func:`data_pipeline.views.describe_views`).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence

from dam.errors import DamInputError

__all__ = [
    "PROMPT_VARIANTS",
    "FIELDS",
    "normalize_category",
    "object_phrase",
    "variant_order",
    "build_prompt",
    "check_templates",
]

FIELDS = ("object", "category", "views")
"""The fields a prompt template may use."""

PROMPT_VARIANTS: tuple[str, ...] = (
    "{views} Describe {object} in detail: its shape, colors, materials, textures, parts and any "
    "patterns or text on it. Write one fluent paragraph about the object itself, without mentioning "
    "the outline, the darkening, the crop or the images.",
    "{views} Write a detailed description of {object}. Say what it is, then cover its color, shape, "
    "material, surface texture, notable parts and its state or pose. Describe only the object, not "
    "the highlighting or the images.",
    "{views} What does {object} look like? Give a rich and precise description of its appearance "
    "(colors, shapes, materials, parts, textures, distinctive details) in a few sentences. Do not "
    "refer to the highlight, the outline or the crop.",
    "{views} Provide a detailed caption of {object} alone: start with what it is, then describe its "
    "visual attributes such as color, shape, material and fine details. Do not mention that it is "
    "highlighted or outlined.",
    "{views} Focus on {object} and describe it thoroughly in natural prose: what it is, its "
    "appearance, colors, textures, parts and any visible text or patterns. Do not say that it is "
    "marked and do not mention the images or the crop.",
)
"""The built-in phrasings (a config's ``prompts:`` list replaces them)."""


def normalize_category(category: str | None) -> str | None:
    """A dataset category name as prose: LVIS' ``teddy_bear`` -> ``teddy bear``; blank -> None.

    Parenthesised disambiguations (LVIS ``bow_(weapon)``) are kept: they are what makes the
    name unambiguous to the labeler.
    """
    if category is None:
        return None
    text = re.sub(r"\s+", " ", category.replace("_", " ")).strip()
    return text or None


def object_phrase(category: str | None) -> str:
    """How the prompt names the region: "the highlighted dog", or "the highlighted object"."""
    name = normalize_category(category)
    return f"the highlighted {name or 'object'}"


def variant_order(seed: int, count: int) -> list[int]:
    """A permutation of ``range(count)`` that depends only on ``seed``: attempt k of a region
    uses variant ``order[k % count]`` (so a re-ask after a refusal uses another phrasing).

    Built from SHA-256 rather than ``random`` so that it is the same on every Python version
    and platform, and neighbouring seeds get unrelated orders.
    """
    if count < 1:
        raise DamInputError("there must be at least one prompt variant")

    def key(index: int) -> bytes:
        return hashlib.sha256(f"{int(seed)}:{index}".encode()).digest()

    return sorted(range(count), key=key)


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """``templates`` as a tuple, or DamInputError naming a template with an unknown field."""
    if not templates:
        raise DamInputError("labeler.prompts is empty: give at least one template, or leave it out")
    for index, template in enumerate(templates):
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as error:
            raise DamInputError(f"labeler.prompts.{index} is not a valid template ({error})") from None
        unknown = fields - set(FIELDS)
        if unknown:
            raise DamInputError(
                f"labeler.prompts.{index} uses unknown field(s) {sorted(unknown)}; templates may use "
                f"{{object}}, {{category}} and {{views}} (double other braces: {{{{ }}}})"
            )
    return tuple(templates)


def build_prompt(
    category: str | None,
    seed: int,
    attempt: int = 0,
    *,
    views: str = "",
    templates: Sequence[str] = PROMPT_VARIANTS,
) -> str:
    """The prompt of attempt ``attempt`` for a region with this category and seed."""
    order = variant_order(seed, len(templates))
    template = templates[order[attempt % len(order)]]
    text = template.format(
        object=object_phrase(category), category=normalize_category(category) or "object", views=views
    )
    return re.sub(r"\s+", " ", text).strip()
