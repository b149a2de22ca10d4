"""`dam serve --generation fast`: continuous batching gives the plain path's API behaviour.

Against a fast and a plain server of the same tiny model: the same greedy texts (plain and
streamed) for concurrent requests of different lengths, a request that arrives mid-decode
joining a running one, a disconnect freeing a slot for a waiting request, seeded sampling that
does not depend on batching (nor on the path), stop strings and /health counts. Below them, the
engine features the server relies on: an open prompt source, per-row settings and seeds,
`on_tokens` ending rows, and growing buffers.
"""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
from transformers import LlamaForCausalLM

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from dam import DescribeAnything  # noqa: E402
from dam.errors import DamInputError  # noqa: E402
from dam.generation import FastGenerator, RowChooser, SamplingSettings, engine, row_generator  # noqa: E402
from dam.server import BackgroundServer, ServerSettings, create_app  # noqa: E402
from dam.server.continuous import resolve_generation  # noqa: E402
from tests.factories import box_mask, tiny_dam, tiny_llama_config  # noqa: E402
from tests.test_server import (  # noqa: E402,F401 (describer is a fixture)
    GOOD, IMAGE, MASK, QUERY, H, W, ask, cutout, describer, health, image_part, open_stream, streamed, user, wait_until,
)

MASKS = [box_mask(H, W, 2 + 5 * i, 4, 20 + 5 * i, 40) for i in range(8)]
LENGTHS = [3, 17, 6, 12, 1, 9, 15, 4]  # max_tokens of the concurrent requests: rows end at different steps


def greedy(describer, mask=MASK, tokens: int = 12, **kwargs) -> str:
    return describer.describe(IMAGE, mask, query=QUERY, max_new_tokens=tokens, do_sample=False, **kwargs)


def client_of(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def servers(describer):
    """A fast and a plain server of the same model; --max-batch 4, so 8 requests need refills."""
    def app(generation: str):
        return create_app(describer, ServerSettings(generation=generation, max_batch=4, max_image_pixels=64 * 64))

    with BackgroundServer(app("fast")) as fast, BackgroundServer(app("plain")) as plain:
        assert health(fast)["generation"] == "fast" and health(plain)["generation"] == "plain"
        yield fast, plain


def concurrently(server, requests: list[dict]) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion_tokens) of each request, all sent at once (streamed
    ones with "stream": True, their text joined from the chunks)."""
    client = client_of(server)
    results: list[tuple[str, str, int] | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(index: int) -> None:
        request = dict(requests[index])
        messages = request.pop("messages", GOOD)
        start.wait()
        if request.pop("stream", False):
            pieces, finish, usage = streamed(client, messages, **request)
            results[index] = ("".join(pieces), finish, usage.completion_tokens)
        else:
            reply = ask(client, messages, **request)
            results[index] = (reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]


# ---- the server -------------------------------------------------------------------------


def test_concurrent_requests_of_different_lengths_equal_plain(describer, servers):
    fast, plain = servers
    requests = [dict(messages=user(image_part(cutout(IMAGE, m))), max_tokens=n, stream=i % 2 == 1)
                for i, (m, n) in enumerate(zip(MASKS, LENGTHS))]
    before = health(fast)
    got = concurrently(fast, requests)
    after = health(fast)
    assert got == concurrently(plain, requests)
    assert [text for text, _, _ in got] == [greedy(describer, m, n) for m, n in zip(MASKS, LENGTHS)]
    assert [tokens for _, _, tokens in got] == LENGTHS and {finish for _, finish, _ in got} == {"length"}
    # Fewer steps (prefills included) than tokens: requests decoded together; and at --max-batch
    # 4, the later ones were admitted as the earlier ones ended.
    assert after["steps"] - before["steps"] < sum(LENGTHS) == after["tokens"] - before["tokens"]
    assert after["batches"] - before["batches"] >= 2 and after["queued"] == after["running"] == 0


def test_a_request_arriving_mid_decode_joins_the_running_batch(describer, servers):
    fast, _ = servers
    long_tokens = 600
    connection, response = open_stream(fast, max_tokens=long_tokens)  # streams for seconds on a CPU
    try:
        pieces = [response.readline()]
        wait_until(lambda: health(fast)["running"] == 1)
        before = health(fast)
        short = ask(client_of(fast), user(image_part(cutout(IMAGE, MASKS[2]))), max_tokens=12)
        assert short.choices[0].message.content == greedy(describer, MASKS[2])
        state = health(fast)
        assert state["running"] == 1, "the short request should end while the long one decodes"
        # The long row gets a token in every step; the short one's came in the same steps
        # (all but its first, from its own prefill).
        shared = (state["tokens"] - before["tokens"]) - (state["steps"] - before["steps"])
        assert shared >= 10, "the short request should have decoded together with the long one"
        while not pieces[-1].startswith(b"data: [DONE]"):
            pieces.append(response.readline())
    finally:
        connection.close()
    text, finish = "", None
    for line in pieces:
        if line.startswith(b"data: {"):
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    assert finish == "length"
    assert text == greedy(describer, MASK, long_tokens, min_new_tokens=long_tokens)


@pytest.mark.parametrize("generation", ["fast", "plain"])
def test_disconnect_frees_the_slot_for_a_waiting_request(describer, generation):
    settings = ServerSettings(generation=generation, max_batch=1, max_queue=1)
    with BackgroundServer(create_app(describer, settings)) as server:
        client = client_of(server)
        connection, _ = open_stream(server, max_tokens=3000)  # seconds of generation on a CPU
        wait_until(lambda: health(server)["running"] == 1)
        queued: list[str] = []
        waiter = threading.Thread(target=lambda: queued.append(ask(client).choices[0].message.content))
        waiter.start()
        wait_until(lambda: health(server)["queued"] == 1)
        state = health(server)
        assert state["running"] == 1 and state["generation"] == generation
        with pytest.raises(openai.APIStatusError) as raised:
            ask(client)
        assert raised.value.status_code == 503 and raised.value.code == "queue_full"
        connection.close()  # the client goes away mid-stream
        freed = wait_until(lambda: bool(queued), timeout=20)
        waiter.join(10)
        assert freed < 5, "the disconnected stream should free its slot at once"
        assert queued[0] == greedy(describer)
        state = health(server)
        assert state["running"] == state["queued"] == 0
        assert state["batches"] == 2 and state["mean_batch_size"] == 1.0  # the stream, then the waiting request


def test_seeds_give_the_same_text_however_batched_and_on_either_path(servers):
    fast, plain = servers
    seeded = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    alone = ask(client_of(fast), **seeded).choices[0].message.content
    assert ask(client_of(plain), **seeded).choices[0].message.content == alone
    others = [dict(messages=user(image_part(cutout(IMAGE, m))), max_tokens=n, temperature=1.3, seed=s)
              for m, n, s in zip(MASKS[:3], (4, 14, 8), (1, 2, None))]
    others += [dict(messages=user(image_part(cutout(IMAGE, MASKS[4]))), max_tokens=6)]
    for server in (fast, plain):
        batched = concurrently(server, [*others[:2], dict(seeded, stream=True), *others[2:], dict(seeded)])
        assert batched[2][0] == batched[-1][0] == alone
    texts = {ask(client_of(fast), temperature=1.5, seed=seed).choices[0].message.content for seed in range(4)}
    assert len(texts) > 1


def test_stop_strings_and_min_tokens_equal_plain(servers):
    fast, plain = servers
    full = ask(client_of(fast), max_tokens=10).choices[0].message.content
    words = full.split()
    stop = words[3] if words[3] not in words[:3] else words[2]
    requests = [dict(max_tokens=10, stop=[stop]), dict(max_tokens=10, stop=stop, stream=True),
                dict(max_tokens=10, stop=["no such words here", stop]), dict(max_tokens=20, extra_body={"min_tokens": 20})]
    got = concurrently(fast, requests)
    assert got == concurrently(plain, requests)
    cut = full[: full.index(stop)].rstrip()
    assert got[0][:2] == got[1][:2] == got[2][:2] == (cut, "stop")
    assert got[3][2] == 20


def test_generation_modes_resolve(describer, caplog):
    assert resolve_generation(describer, None) == resolve_generation(describer, "auto") == "fast"  # on a CPU too
    assert resolve_generation(describer, "fast") == "fast" and resolve_generation(describer, "plain") == "plain"
    with_plain = DescribeAnything(describer.model, describer.tokenizer, generation="plain")
    assert resolve_generation(with_plain, None) == "plain" and resolve_generation(with_plain, "fast") == "fast"
    with pytest.raises(DamInputError, match="generation must be one of"):
        resolve_generation(describer, "quick")
    penalised = DescribeAnything(tiny_dam(seed=3), describer.tokenizer)
    penalised.model.generation_config.repetition_penalty = 1.3  # plain `generate` applies it to every request
    with caplog.at_level(logging.INFO, logger="dam.server.continuous"):
        assert resolve_generation(penalised, "fast") == "plain" and resolve_generation(penalised, "auto") == "plain"
    assert [record.levelno for record in caplog.records] == [logging.WARNING, logging.INFO]
    assert any("repetition_penalty" in record.getMessage() for record in caplog.records)


# ---- the engine features it uses --------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=99)).eval()


def prompt_ids(count: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 9, 4, 12, 20, 6, 15, 8, 11, 5, 30][:count]
    return [torch.randint(3, 99, (length,), generator=generator) for length in lengths]


class OpenQueue:
    """A prompt source that grows while the engine runs (as a server's request queue)."""

    def __init__(self, lm, prompts: list[torch.Tensor]) -> None:
        self.embedding = lm.get_input_embeddings()
        self.prompts = prompts
        self.waiting: list[int] = []

    def add(self, *indices: int) -> None:
        self.waiting.extend(indices)

    def __len__(self) -> int:
        return len(self.waiting)

    def take(self, count: int) -> list[tuple[int, torch.Tensor]]:
        taken, self.waiting = self.waiting[:count], self.waiting[count:]
        return [(index, self.embedding(self.prompts[index])) for index in taken]


@torch.no_grad()
def reference(lm, prompts: list[torch.Tensor], max_new: int) -> list[list[int]]:
    """transformers `generate`, greedy, each prompt alone, no EOS."""
    return [lm.generate(p[None], attention_mask=torch.ones_like(p)[None], max_new_tokens=max_new, do_sample=False,
                        eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_engine_takes_prompts_that_arrive_while_it_decodes(lm, monkeypatch):
    monkeypatch.setattr(engine, "UPFRONT_COLUMNS", 2)  # so that rows also outgrow the columns mid-decode
    prompts = prompt_ids(12)
    limits = [4 + (3 * i) % 11 for i in range(12)]  # each prompt its own max_new_tokens
    limits[-1] = 40  # the last, longest prompt also needs more columns than the first ones
    expected = [tokens[:limit] for tokens, limit in zip(reference(lm, prompts, 40), limits)]
    queue = OpenQueue(lm, prompts)
    queue.add(0)
    arrivals = {2: [1, 2], 5: [3, 4, 5, 6, 7], 9: [8, 9, 10], 12: [11]}  # call number -> prompts added
    calls, seen = [0], {}

    def on_tokens(produced):
        calls[0] += 1
        for index, token in produced:
            seen.setdefault(index, []).append(token)
        queue.add(*arrivals.get(calls[0], []))

    generator = FastGenerator(lm, max_slots=4)
    result = generator.generate(queue, lambda index: SamplingSettings(limits[index]), on_tokens=on_tokens)
    assert result == expected and [seen[i] for i in range(12)] == expected
    assert generator.stats.prompts == 12 and generator.stats.refills > 0
    assert generator._cache.slots == 4 and generator._cache.capacity >= len(prompts[-1]) + 40  # both grew
    assert generator.stats.growths >= 4
    assert max(rows for rows, _ in generator.stats.step_shapes) == 4


def test_on_tokens_ends_rows_and_frees_their_slots(lm):
    prompts = prompt_ids(5)
    full = reference(lm, prompts, 10)
    queue = OpenQueue(lm, prompts)
    queue.add(0, 1, 2, 3, 4)
    finished = []

    def end_two(produced):  # as a server whose clients 0 and 2 went away after their first token
        return [index for index, _ in produced if index in (0, 2)]

    # Rows 0 and 2 may ask for a million tokens: columns are allocated as rows reach them.
    settings = {index: SamplingSettings(10 ** 6 if index in (0, 2) else 10) for index in range(5)}
    generator = FastGenerator(lm, max_slots=2)
    result = generator.generate(queue, settings.__getitem__, on_tokens=end_two,
                                on_finish=lambda index, tokens: finished.append((index, len(tokens))))
    assert result == [full[0][:1], full[1], full[2][:1], full[3], full[4]]
    assert sorted(finished) == [(0, 1), (1, 10), (2, 1), (3, 10), (4, 10)]
    assert generator._cache.capacity < 2 * engine.UPFRONT_COLUMNS


def test_seeded_rows_do_not_depend_on_their_batch(lm):
    prompts = prompt_ids(6)

    def settings(index: int) -> SamplingSettings:
        if index == 5:
            return SamplingSettings(6)  # a greedy row among sampled ones
        return SamplingSettings(8, do_sample=True, temperature=1.3, top_p=0.9, top_k=40 if index % 2 else 0,
                                seed=100 + index, min_new_tokens=2 if index == 1 else 0, eos_token_ids=(5,))

    def run(order: list[int], max_slots: int) -> dict[int, list[int]]:
        queue = OpenQueue(lm, prompts)
        queue.add(*order)
        tokens: dict[int, list[int]] = {}
        FastGenerator(lm, max_slots=max_slots).generate(
            queue, settings, on_finish=lambda index, new: tokens.__setitem__(index, new))
        return tokens

    alone = {index: run([index], 1)[index] for index in range(6)}
    assert run([0, 1, 2, 3, 4, 5], 6) == alone
    assert run([5, 3, 1, 4, 0, 2], 2) == alone
    assert alone[5] == reference(lm, prompts[5:], 6)[0]
    assert len({tuple(tokens) for tokens in alone.values()}) == 6


def test_row_chooser_draws_what_multinomial_draws():
    """The plain server's former per-row sampler (softmax / temperature, top-p over the sorted
    probabilities, multinomial from the row's seeded generator) draws the same tokens."""
    scores = torch.randn(5, 60, generator=torch.Generator().manual_seed(0)) * 3
    settings = [SamplingSettings(4, do_sample=True, temperature=t, top_p=p, seed=s)
                for t, p, s in ((1.0, 0.9, 1), (0.7, 1.0, 2), (1.5, 0.5, 3), (1.0, 0.05, 4))] + [SamplingSettings(4)]
    chooser = RowChooser(settings, [row_generator(s.seed, "cpu") for s in settings], "cpu")
    generators = [row_generator(s.seed, "cpu") for s in settings]
    for _ in range(3):
        expected = []
        for row, s in enumerate(settings):
            if not s.do_sample:
                expected.append(int(scores[row].argmax()))
                continue
            probabilities = torch.softmax(scores[row] / s.temperature, dim=-1)
            if s.top_p < 1:
                ordered, order = probabilities.sort(descending=True)
                probabilities = probabilities.scatter(0, order[ordered.cumsum(0) - ordered >= s.top_p], 0.0)
            expected.append(int(torch.multinomial(probabilities, 1, generator=generators[row])))
        assert chooser(scores, torch.zeros(5, dtype=torch.long)).tolist() == expected
