"""`dam serve`: the official openai client against a tiny model served on 127.0.0.1.

Plain and streamed completions of images and videos equal `describe` / `describe_video`;
sampling settings, stop strings and usage; every 400 case, each followed by a good request;
dynamic batching, a full queue (503), and a client that disconnects mid-stream.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from dam import DescribeAnything  # noqa: E402
from dam.server import BackgroundServer, ServerSettings, create_app  # noqa: E402
from dam.server.rows import visible_text  # noqa: E402
from tests.factories import box_mask, random_image, tiny_dam, tiny_tokenizer  # noqa: E402

H, W = 48, 64
QUERY = "describe the object ."
GREEDY = dict(max_new_tokens=12, do_sample=False)


def data_url(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def cutout(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.dstack([image, mask.astype(np.uint8) * 255])


def image_part(array: np.ndarray) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(array)}}


def user(*parts: dict, query: str | None = QUERY) -> list[dict]:
    content = list(parts) + ([{"type": "text", "text": query}] if query is not None else [])
    return [{"role": "user", "content": content}]


IMAGE = random_image(H, W, seed=5)
MASK = box_mask(H, W, 10, 8, 40, 30)
GOOD = user(image_part(cutout(IMAGE, MASK)))


@pytest.fixture(scope="module")
def describer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server") / "model"
    DescribeAnything(tiny_dam(seed=3), tiny_tokenizer()).save_pretrained(folder)
    return DescribeAnything.from_pretrained(folder)


@pytest.fixture(scope="module")
def server(describer):
    settings = ServerSettings(model_name="tiny-dam", max_image_pixels=64 * 64)
    with BackgroundServer(create_app(describer, settings)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, messages=GOOD, **kwargs):
    return client.chat.completions.create(model="tiny-dam", messages=messages, **{"max_tokens": 12, **kwargs})


def streamed(client, messages=GOOD, **kwargs) -> tuple[list[str], str | None, object]:
    pieces, finish, usage = [], None, None
    for chunk in ask(client, messages, stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            if chunk.choices[0].delta.content is not None:
                assert isinstance(chunk.choices[0].delta.content, str)
                pieces.append(chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason or finish
    return pieces, finish, usage


def health(server) -> dict:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())


# ---- good requests ----------------------------------------------------------------------


def test_image_plain_and_streamed_equal_describe(describer, client):
    expected = describer.describe(IMAGE, MASK, query=QUERY, **GREEDY)
    assert expected
    reply = ask(client)
    assert reply.choices[0].message.content == expected
    assert reply.model == "tiny-dam" and len(reply.choices) == 1
    prompt_tokens = len(describer.processor.prompt_ids(QUERY, 1))
    assert reply.usage.prompt_tokens == prompt_tokens > describer.model.config.num_image_tokens
    assert reply.usage.completion_tokens >= len(expected.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    pieces, finish, usage = streamed(client)
    assert len(pieces) > 2 and "".join(pieces) == expected
    assert finish == reply.choices[0].finish_reason
    assert usage.prompt_tokens == prompt_tokens and usage.completion_tokens == reply.usage.completion_tokens


def test_image_and_separate_mask_part(describer, client):
    expected = describer.describe(IMAGE, MASK, query=QUERY, **GREEDY)
    gray_mask = MASK.astype(np.uint8) * 255
    assert ask(client, user(image_part(IMAGE), image_part(gray_mask))).choices[0].message.content == expected
    opaque = np.dstack([IMAGE, np.full((H, W), 255, np.uint8)])  # what a browser canvas exports
    assert ask(client, user(image_part(opaque), image_part(gray_mask))).choices[0].message.content == expected


def test_default_query_and_base_url_without_v1(describer, server):
    expected = describer.describe(IMAGE, MASK, **GREEDY)
    bare = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    assert ask(bare, user(image_part(cutout(IMAGE, MASK)), query=None)).choices[0].message.content == expected
    assert [model.id for model in bare.models.list()] == ["tiny-dam"]


def test_video_cutouts_and_pairs_equal_describe_video(describer, client):
    frames = [random_image(H, W, seed=30 + t) for t in range(8)]
    masks = [box_mask(H, W, 4 + 3 * t, 6, 24 + 3 * t, 30) for t in range(8)]
    expected = describer.describe_video(frames, masks, query=QUERY, **GREEDY)
    reply = ask(client, user(*[image_part(cutout(f, m)) for f, m in zip(frames, masks)]))
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(describer.processor.prompt_ids(QUERY, 8))
    pairs = [part for f, m in zip(frames, masks) for part in (image_part(f), image_part(m.astype(np.uint8) * 255))]
    pieces, _, _ = streamed(client, user(*pairs))
    assert "".join(pieces) == expected


def test_sampling_seed_stop_and_length(client):
    first = ask(client, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert ask(client, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content == first
    assert len({ask(client, temperature=1.5, seed=s).choices[0].message.content for s in range(4)}) > 1
    greedy = ask(client, max_tokens=10)
    words = greedy.choices[0].message.content.split()
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 10
    stop = words[3] if words[3] not in words[:3] else words[2]
    cut = ask(client, max_tokens=10, stop=[stop])
    text = greedy.choices[0].message.content
    assert cut.choices[0].message.content == text[: text.index(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"
    pieces, finish, _ = streamed(client, max_tokens=10, stop=stop)
    assert "".join(pieces) == cut.choices[0].message.content and finish == "stop"
    long = ask(client, max_tokens=20, extra_body={"min_tokens": 20})
    assert long.usage.completion_tokens == 20


def test_concurrent_requests_are_batched_and_each_equals_describe(describer, server, client):
    masks = [box_mask(H, W, 2 + 5 * i, 4, 20 + 5 * i, 40) for i in range(8)]
    expected = [describer.describe(IMAGE, m, query=QUERY, **GREEDY) for m in masks]
    before = health(server)
    results: list[str | None] = [None] * len(masks)

    def one(index: int) -> None:
        results[index] = ask(client, user(image_part(cutout(IMAGE, masks[index])))).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(masks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected
    after = health(server)
    assert after["batches"] - before["batches"] < len(masks), "concurrent requests should share generations"
    assert after["status"] == "ok" and after["queued"] == 0


# ---- bad requests -----------------------------------------------------------------------


def rgba(alpha: np.ndarray) -> np.ndarray:
    return np.dstack([IMAGE, alpha.astype(np.uint8)])


BAD_REQUESTS = {
    "no_mask": dict(messages=user(image_part(IMAGE))),
    "empty_mask": dict(messages=user(image_part(rgba(np.zeros((H, W)))))),
    "empty mask part": dict(messages=user(image_part(IMAGE), image_part(np.zeros((H, W), np.uint8)))),
    "invalid_mask": dict(messages=user(image_part(IMAGE), image_part(random_image(H, W, seed=9)))),  # a photo as mask
    "mask_size_mismatch": dict(messages=user(image_part(IMAGE), image_part(np.full((40, W), 255, np.uint8)))),
    "invalid_base64": dict(messages=user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}})),
    "invalid_image": dict(messages=user({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}})),
    "unsupported_url": dict(messages=user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})),
    "unsupported_frame_count": dict(messages=user(*[image_part(cutout(IMAGE, MASK))] * 3)),
    "image_too_large": dict(messages=user(image_part(cutout(random_image(80, 80, 1), box_mask(80, 80, 5, 5, 30, 30))))),
    "no_image": dict(messages=[{"role": "user", "content": "describe the object"}]),
    "unsupported_parameter": dict(messages=GOOD, n=2),
    "invalid_query": dict(messages=user(image_part(cutout(IMAGE, MASK)), query="<image> <image> two slots")),
    "invalid_value": dict(messages=GOOD, temperature=5),
}
EXPECTED_PARAM = {
    "no_mask": "messages[0].content[0].image_url.url",
    "mask_size_mismatch": "messages[0].content[1].image_url.url",
    "invalid_base64": "messages[0].content[0].image_url.url",
    "unsupported_parameter": "n",
    "invalid_value": "temperature",
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_400_and_the_server_stays_up(case, describer, client):
    with pytest.raises(openai.BadRequestError) as raised:
        ask(client, **BAD_REQUESTS[case])
    error = raised.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.code == case.replace("empty mask part", "empty_mask")
    assert error.param == EXPECTED_PARAM.get(case, error.param)
    assert len(error.message) > 30
    assert ask(client).choices[0].message.content == describer.describe(IMAGE, MASK, query=QUERY, **GREEDY)


def raw_post(server, body: bytes) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize(
    "body, code",
    [(b"{not json", "invalid_json"), (b"[1, 2]", "invalid_body"), (b'{"model": "x"}', "invalid_body"),
     (b'{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}', "invalid_body")],
)
def test_malformed_bodies_are_400(body, code, server, client):
    status, reply = raw_post(server, body)
    assert status == 400 and reply["error"]["code"] == code and reply["error"]["type"] == "invalid_request_error"
    assert ask(client).choices[0].message.content


def test_visible_text_holds_back_what_may_change():
    assert visible_text("  a red ci", ("circle",), final=False) == ("a red", False)
    assert visible_text("  a red circle here", ("circle",), final=False) == ("a red", True)
    assert visible_text("a red ", (), final=False) == ("a red", False)
    assert visible_text("a r\ufffd", (), final=False) == ("a r", False)
    assert visible_text(" a red ", (), final=True) == ("a red", False)


# ---- load shedding and disconnects ------------------------------------------------------


def open_stream(server, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed request that would run for `max_tokens` tokens; returns once it is generating."""
    body = {"model": "m", "messages": GOOD, "stream": True, "max_tokens": max_tokens, "min_tokens": max_tokens}
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert response.readline().startswith(b"data: ")
    return connection, response


def wait_until(predicate, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_full_queue_503_and_disconnect_frees_the_slot(describer):
    settings = ServerSettings(max_batch=1, max_queue=1)
    with BackgroundServer(create_app(describer, settings)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        connection, _ = open_stream(server, max_tokens=3000)  # seconds of generation on a CPU
        wait_until(lambda: health(server)["running"] == 1)
        queued: list[str] = []
        waiter = threading.Thread(target=lambda: queued.append(ask(client).choices[0].message.content))
        waiter.start()
        wait_until(lambda: health(server)["queued"] == 1)
        with pytest.raises(openai.APIStatusError) as raised:
            ask(client)
        assert raised.value.status_code == 503 and raised.value.code == "queue_full"
        assert raised.value.response.headers["retry-after"] == "1"
        connection.close()  # the client goes away mid-stream
        freed = wait_until(lambda: bool(queued), timeout=20)
        waiter.join(10)
        assert freed < 5, "the disconnected stream should stop generating at once"
        assert queued[0] == describer.describe(IMAGE, MASK, query=QUERY, **GREEDY)
        assert health(server)["running"] == 0
        assert ask(client).choices[0].message.content == queued[0]


def test_segment_endpoint_uses_sam(describer):
    class FakeSam:
        def mask_from_box(self, image, box):
            return box_mask(image.shape[0], image.shape[1], *[int(v) for v in box])

        def mask_from_points(self, image, points, labels=None):
            x, y = points[0]
            return box_mask(image.shape[0], image.shape[1], int(x) - 3, int(y) - 3, int(x) + 3, int(y) + 3)

    with_sam = DescribeAnything(describer.model, describer.tokenizer, sam=FakeSam())
    with BackgroundServer(create_app(with_sam, ServerSettings(ui=True))) as server:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        body = {"image": data_url(IMAGE), "box": [10, 8, 40, 30]}
        connection.request("POST", "/v1/segment", body=json.dumps(body), headers={"Content-Type": "application/json"})
        reply = json.loads(connection.getresponse().read())
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["mask"].split(",", 1)[1])))) >= 128
        assert (mask == MASK).all() and reply["area"] == int(MASK.sum())
        connection.request("GET", "/")
        page = connection.getresponse()
        assert page.status == 200 and b"Describe Anything" in page.read()
        assert health(server)["sam"] is True
    with BackgroundServer(create_app(describer, ServerSettings())) as server:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        connection.request("POST", "/v1/segment", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 400 and b"--sam-checkpoint" in response.read()
