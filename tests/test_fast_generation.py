"""Fast generation (dam.generation): the greedy tokens of transformers `generate` across slots,
refill and compaction; stopping; sampling; settings it refuses; fallbacks; DescribeAnything."""

import logging

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from dam import DescribeAnything
from dam.errors import DamInputError
from dam.generation import FastGenerator, PromptQueue, SamplingSettings
from dam.generation.sampling import filter_scores
from tests.factories import tiny_dam, tiny_llama_config, tiny_tokenizer
from tests.test_describe import regions_of_different_sizes

MAX_NEW = 12


def stop_steps(reference: list[list[int]], eos: tuple[int, ...]) -> list[int]:
    """Where each sequence of `reference` (generated without EOS) would end with `eos`."""
    return [next((i for i, t in enumerate(seq) if t in eos), len(seq) - 1) for seq in reference]


def diverse_eos(reference: list[list[int]]) -> tuple[int, ...]:
    """Two token ids that, as EOS, end one sequence at its first token and the others at as
    many different steps as possible (some not at all)."""
    tokens = sorted({t for seq in reference for t in seq})
    # first[i, r]: where token i first occurs in sequence r (its last step if it does not).
    first = torch.tensor([stop_steps(reference, (token,)) for token in tokens])  # (N, R)
    steps = torch.minimum(first[:, None], first[None, :])  # (N, N, R): ends with each pair as EOS
    ordered = steps.sort(dim=-1).values
    distinct = 1 + (ordered[..., 1:] != ordered[..., :-1]).sum(-1)  # (N, N)
    score = distinct + 100 * (ordered[..., 0] == 0)  # an EOS at the first step above all
    a, b = divmod(int(score.argmax()), len(tokens))
    return tokens[a], tokens[b]


def truncate(sequence: list[int], eos: tuple[int, ...]) -> list[int]:
    ends = [i for i, t in enumerate(sequence) if t in eos]
    return sequence[: ends[0] + 1] if ends else sequence


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=99)).eval()


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(1)
    lengths = [3, 17, 9, 4, 12, 20, 6, 15, 8, 11, 5]
    return [torch.randint(3, 99, (length,), generator=generator) for length in lengths]


def queue_of(lm, prompts, chunk_size: int = 4) -> PromptQueue:
    embedding = lm.get_input_embeddings()
    return PromptQueue([len(p) for p in prompts], lambda indices: [embedding(prompts[i]) for i in indices], chunk_size)


@torch.no_grad()
def plain_generate(lm, prompts, eos: tuple[int, ...], **kwargs) -> list[list[int]]:
    """transformers `generate` on the left-padded batch, cut after each row's first EOS."""
    length = max(len(p) for p in prompts)
    weight = lm.get_input_embeddings().weight
    embeds = weight.new_zeros((len(prompts), length, lm.config.hidden_size))
    mask = torch.zeros((len(prompts), length), dtype=torch.long, device=weight.device)
    for row, prompt in enumerate(prompts):
        embeds[row, length - len(prompt) :] = lm.get_input_embeddings()(prompt)
        mask[row, length - len(prompt) :] = 1
    output = lm.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=list(eos) or None, pad_token_id=0,
                         **kwargs)
    return [truncate(row, eos) for row in output.tolist()]


@pytest.fixture(scope="module")
def eos_and_reference(lm, prompts):
    without_eos = plain_generate(lm, prompts, (), max_new_tokens=MAX_NEW, do_sample=False)
    eos = diverse_eos(without_eos)
    steps = stop_steps(without_eos, eos)
    assert 0 in steps and len(set(steps)) >= 4, f"the test needs captions ending at different steps, got {steps}"
    return eos, plain_generate(lm, prompts, eos, max_new_tokens=MAX_NEW, do_sample=False)


@pytest.mark.parametrize(
    "options",
    [
        dict(max_slots=1),
        dict(max_slots=3),  # refills one or more slots while the others decode
        dict(max_slots=4, refill=False),  # static batches
        dict(max_slots=4, refill_fraction=1.0, power_of_two_rows=True, width_bucket=64, prefill_tokens=40),
        dict(max_slots=16, compact_fraction=0.9),  # one batch, compacted as captions end
    ],
)
def test_greedy_equals_generate(lm, prompts, eos_and_reference, options):
    eos, reference = eos_and_reference
    generator = FastGenerator(lm, **options)
    finished = []
    tokens = generator.generate(queue_of(lm, prompts), SamplingSettings(MAX_NEW, eos_token_ids=eos),
                                on_finish=lambda index, _: finished.append(index))
    assert tokens == reference
    assert sorted(finished) == list(range(len(prompts)))
    stats = generator.stats
    assert stats.live_row_steps == sum(len(seq) - 1 for seq in reference)
    if options["max_slots"] == 3:
        assert stats.refills > 0
    if options.get("compact_fraction"):
        assert stats.compactions > 0 and stats.computed_row_steps < len(prompts) * stats.decode_steps
    if options.get("power_of_two_rows"):
        assert all(rows & (rows - 1) == 0 and width % 64 == 0 for rows, width in stats.step_shapes)


def test_eager_attention_takes_the_same_masks(lm, prompts, eos_and_reference):
    eos, reference = eos_and_reference
    eager_attention = LlamaForCausalLM(tiny_llama_config(vocab_size=99, attn_implementation="eager")).eval()
    eager_attention.load_state_dict(lm.state_dict())
    generator = FastGenerator(eager_attention, max_slots=3)
    settings = SamplingSettings(MAX_NEW, eos_token_ids=eos)
    assert generator.generate(queue_of(eager_attention, prompts), settings) == reference


def test_buffers_are_reused_across_calls(lm, prompts, eos_and_reference):
    eos, reference = eos_and_reference
    generator = FastGenerator(lm, max_slots=4)
    settings = SamplingSettings(MAX_NEW, eos_token_ids=eos)
    assert generator.generate(queue_of(lm, prompts), settings) == reference
    cache = generator._cache
    assert generator.generate(queue_of(lm, prompts[:3]), settings, max_slots=2) == reference[:3]
    assert generator._cache is cache  # smaller calls reuse (and must reset) the same buffers
    assert generator.generate(queue_of(lm, prompts), settings) == reference


def test_max_and_min_new_tokens(lm, prompts, eos_and_reference):
    eos, _ = eos_and_reference
    generator = FastGenerator(lm, max_slots=4)
    exact = generator.generate(queue_of(lm, prompts), SamplingSettings(5))
    assert [len(seq) for seq in exact] == [5] * len(prompts)
    at_least = generator.generate(queue_of(lm, prompts), SamplingSettings(MAX_NEW, min_new_tokens=4, eos_token_ids=eos))
    assert at_least == plain_generate(lm, prompts, eos, max_new_tokens=MAX_NEW, min_new_tokens=4, do_sample=False)
    assert min(len(seq) for seq in at_least) >= 4
    single = generator.generate(queue_of(lm, prompts), SamplingSettings(1, eos_token_ids=eos))
    assert single == [seq[:1] for seq in plain_generate(lm, prompts, eos, max_new_tokens=MAX_NEW, do_sample=False)]


def test_eos_at_the_first_step_ends_without_decoding(lm, prompts):
    generator = FastGenerator(lm, max_slots=4)
    first = [seq[0] for seq in generator.generate(queue_of(lm, prompts), SamplingSettings(1))]
    ended = generator.generate(queue_of(lm, prompts), SamplingSettings(MAX_NEW, eos_token_ids=tuple(set(first))))
    assert ended == [[token] for token in first]
    assert generator.stats.decode_steps == 0


def test_sampling_is_reproducible(lm, prompts):
    generator = FastGenerator(lm, max_slots=3)
    few = prompts[:5]
    settings = SamplingSettings(8, do_sample=True, temperature=1.5, top_p=0.9, top_k=20)

    def run(seed: int | None, sampling: SamplingSettings = settings) -> list[list[int]]:
        if seed is None:  # torch's global generator
            return generator.generate(queue_of(lm, few), sampling)
        return generator.generate(queue_of(lm, few), sampling, generator=torch.Generator().manual_seed(seed))

    assert run(7) == run(7) != run(8)
    torch.manual_seed(3)
    global_first = run(None)
    torch.manual_seed(3)
    assert run(None) == global_first
    top_1 = SamplingSettings(8, do_sample=True, top_k=1)
    assert run(7, top_1) == generator.generate(queue_of(lm, few), SamplingSettings(8))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 10, 0.5), (1.0, 0, 0.01)])
def test_filtering_keeps_what_transformers_keeps(temperature, top_k, top_p):
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    settings = SamplingSettings(4, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    expected = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    torch.testing.assert_close(filter_scores(scores, settings), expected)


def test_settings_resolve_like_generate_and_refuse_the_rest(lm):
    config = lm.generation_config
    settings = SamplingSettings.resolve(config, dict(max_new_tokens=7, do_sample=True, eos_token_id=[2, 5]))
    assert settings == SamplingSettings(7, do_sample=True, top_k=50, eos_token_ids=(2, 5))  # transformers' top_k
    defaults = SamplingSettings.resolve(config, dict(max_new_tokens=7, num_beams=1, repetition_penalty=1.0))
    assert defaults.max_new_tokens == 7 and not defaults.do_sample
    for refused in (dict(num_beams=2), dict(repetition_penalty=1.2), dict(streamer=object()),
                    dict(stopping_criteria=[]), dict(no_repeat_ngram_size=3), dict()):
        reason = SamplingSettings.resolve(config, refused if refused else dict(max_length=30))
        assert isinstance(reason, str) and "fast generation" in reason
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(0)


def test_prompt_queue_embeds_lazily_in_chunks():
    calls = []

    def embed(indices):
        calls.append(list(indices))
        return [torch.zeros(3, 2) for _ in indices]

    queue = PromptQueue([3] * 7, embed, chunk_size=3)
    assert len(queue) == 7 and not calls
    assert [index for index, _ in queue.take(2)] == [0, 1] and calls == [[0, 1, 2]]
    assert [index for index, _ in queue.take(4)] == [2, 3, 4, 5] and calls == [[0, 1, 2], [3, 4, 5]]
    assert len(queue) == 1 and [index for index, _ in queue.take(5)] == [6] and calls[-1] == [6]
    assert not queue.take(1) and len(calls) == 3


def test_prompt_queue_prepares_the_next_chunk_in_the_background():
    prepared, embedded = [], []

    def prepare(indices):
        prepared.append(indices)
        return indices

    def embed(indices):
        embedded.append(indices)
        return [torch.zeros(2, 2) for _ in indices]

    with PromptQueue([2] * 5, embed, chunk_size=2, prepare=prepare) as queue:
        assert [index for index, _ in queue.take(1)] == [0]
        queue._prepared.result()  # the second chunk was submitted before the first was embedded
        assert prepared == [[0, 1], [2, 3]] and embedded == [[0, 1]]
        assert [index for index, _ in queue.take(4)] == [1, 2, 3, 4]
    assert prepared == embedded == [[0, 1], [2, 3], [4]] and queue._executor is None

    def broken(indices):
        raise OSError(f"cannot read image {indices[0]}")

    with PromptQueue([2] * 4, embed, chunk_size=2, prepare=broken) as queue, pytest.raises(OSError, match="image 0"):
        queue.take(1)


@pytest.mark.parametrize("fails_when", ["compiling", "running"])
def test_failing_compile_falls_back_to_eager(lm, prompts, eos_and_reference, monkeypatch, caplog, fails_when):
    eos, reference = eos_and_reference

    def broken_compile(fn, **kwargs):
        if fails_when == "compiling":
            raise RuntimeError("no compiler here")

        def run(*args, **kw):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    generator = FastGenerator(lm, max_slots=4, decode_step="compile")
    settings = SamplingSettings(MAX_NEW, eos_token_ids=eos)
    with caplog.at_level(logging.WARNING, logger="dam.generation.steps"):
        assert generator.generate(queue_of(lm, prompts), settings) == reference
        assert generator.generate(queue_of(lm, prompts), settings, max_slots=8) == reference
    assert generator._cache.slots == 8  # the second call needed new buffers, yet no second attempt
    assert len([r for r in caplog.records if "no compiler here" in r.getMessage()]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_equal_eager(lm, prompts, dtype):
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=99)).eval().to("cuda", dtype)
    model.load_state_dict(lm.state_dict())
    cuda_prompts = [p.cuda() for p in prompts]
    settings = SamplingSettings(MAX_NEW, eos_token_ids=(5, 7))
    eager = FastGenerator(model, max_slots=4, decode_step="eager", power_of_two_rows=True, width_bucket=64)
    graphs = FastGenerator(model, max_slots=4, decode_step="cuda_graph")
    expected = eager.generate(queue_of(model, cuda_prompts), settings)
    assert graphs.generate(queue_of(model, cuda_prompts), settings) == expected
    assert graphs._step is not None and graphs._step.kind == "cuda_graph" and graphs._step._graphs
    assert graphs.generate(queue_of(model, cuda_prompts), settings) == expected  # replayed graphs
    if dtype == torch.float32:
        assert expected == plain_generate(model, cuda_prompts, (5, 7), max_new_tokens=MAX_NEW, do_sample=False)
    sampling = SamplingSettings(MAX_NEW, do_sample=True, top_p=0.9)
    seeded = [graphs.generate(queue_of(model, cuda_prompts), sampling,
                              generator=torch.Generator("cuda").manual_seed(5)) for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_describe_on_cuda_defaults_to_fast_and_equals_plain():
    model = tiny_dam(seed=3).to("cuda")
    auto = DescribeAnything(model, tiny_tokenizer())
    plain = DescribeAnything(model, tiny_tokenizer(), generation="plain")
    regions = regions_of_different_sizes()
    greedy = dict(max_new_tokens=MAX_NEW, do_sample=False)
    assert auto.describe_batch(regions, batch_size=3, **greedy) == plain.describe_batch(regions, batch_size=8, **greedy)
    assert auto._fast is not None and auto._fast.step_kind == "cuda_graph"


# ---- DescribeAnything ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def describers():
    model = tiny_dam(seed=3)
    return (DescribeAnything(model, tiny_tokenizer(), generation="plain"),
            DescribeAnything(model, tiny_tokenizer(), generation="fast"))


def test_describe_batch_fast_equals_plain(describers):
    plain, fast = describers
    queries = [None] * 5 + ["describe the red object .", "the object in one sentence .", "describe the region ."]
    items = [(image, mask, query) for (image, mask), query in zip(regions_of_different_sizes(), queries)]
    without_eos = plain.describe_batch(items, batch_size=8, max_new_tokens=MAX_NEW, do_sample=False)
    reference = [plain.tokenizer.convert_tokens_to_ids(text.split()) for text in without_eos]
    eos = diverse_eos(reference)
    assert len(set(stop_steps(reference, eos))) >= 3
    greedy = dict(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(eos))
    expected = plain.describe_batch(items, batch_size=8, **greedy)
    assert fast.describe_batch(items, batch_size=3, **greedy) == expected
    assert fast._fast is not None and fast._fast.stats.refills > 0
    assert fast.describe_batch(items, batch_size=8, **greedy) == expected
    image, mask, query = items[6]
    assert fast.describe(image, mask, query=query, **greedy) == expected[6]
    sampled = []
    for _ in range(2):
        torch.manual_seed(11)
        sampled.append(fast.describe_batch(items[:4], batch_size=2, max_new_tokens=MAX_NEW, do_sample=True, top_p=0.8))
    assert sampled[0] == sampled[1]


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_unsupported_settings_fall_back_to_generate(describers, caplog):
    plain, fast = describers
    image, mask = regions_of_different_sizes()[1]
    penalised = dict(max_new_tokens=6, do_sample=False, repetition_penalty=1.5)
    with caplog.at_level(logging.INFO, logger="dam.describe"):
        assert fast.describe(image, mask, **penalised) == plain.describe(image, mask, **penalised)
        fast.describe(image, mask, **penalised)
    assert len([r for r in caplog.records if "repetition_penalty" in r.getMessage()]) == 1


def test_generation_mode_defaults_and_validation(describers):
    plain, _ = describers
    auto = DescribeAnything(plain.model, plain.tokenizer)
    image, mask = regions_of_different_sizes()[2]
    assert auto.generation == "auto" and auto._fast_settings(dict(max_new_tokens=4)) is None  # CPU: plain
    auto.generation = "fast"
    settings = auto._fast_settings(dict(max_new_tokens=4))
    assert settings.max_new_tokens == 4 and not settings.do_sample and settings.eos_token_ids == (2,)
    auto.generation = "quick"
    with pytest.raises(DamInputError, match="generation must be one of"):
        auto.describe(image, mask, max_new_tokens=4)


def test_compile_step_raises_dynamos_limit_under_either_name(lm, monkeypatch):
    # torch < 2.7 names the recompilation limit cache_size_limit; the constructor must not fail there.
    import types

    old_torch_config = types.SimpleNamespace(cache_size_limit=8)
    monkeypatch.setattr(torch._dynamo, "config", old_torch_config)
    FastGenerator(lm, max_slots=2, decode_step="compile")
    assert old_torch_config.cache_size_limit == 256
