"""`dam serve` / `dam demo-ui` from the command line, and a small run of bench/speed_serve.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from bench.speed_serve import _free_port, main as speed_serve  # noqa: E402
from dam import DescribeAnything  # noqa: E402
from dam.cli import build_parser, main  # noqa: E402
from tests.factories import tiny_dam, tiny_tokenizer  # noqa: E402
from tests.test_server import GOOD, GREEDY, IMAGE, MASK, QUERY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_dam_serve_process_answers_the_openai_client(tmp_path):
    model = tmp_path / "tiny-dam"
    describer = DescribeAnything(tiny_dam(seed=3), tiny_tokenizer())
    describer.save_pretrained(model)
    port = _free_port()
    command = [sys.executable, "-m", "dam.cli", "serve", "--model", str(model), "--port", str(port),
               "--device", "cpu", "--max-batch", "4", "--ui"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "dam serve did not start"
                time.sleep(0.2)
        assert health["max_batch"] == 4 and health["model"] == "tiny-dam"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny-dam", messages=GOOD, max_tokens=12)
        assert reply.choices[0].message.content == describer.describe(IMAGE, MASK, query=QUERY, **GREEDY)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert b"<canvas" in response.read()
    finally:
        process.terminate()
        process.wait(30)


def test_demo_ui_is_serve_with_the_page_and_bad_options_fail_cleanly(tmp_path, capsys):
    parser = build_parser()
    assert parser.parse_args(["demo-ui"]).ui is True
    assert parser.parse_args(["serve"]).ui is False
    assert parser.parse_args(["serve", "--max-batch", "8"]).max_batch == 8
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_speed_serve_small_run_loses_nothing():
    result = speed_serve(["--requests", "32", "--concurrency", "16", "--max-tokens", "16", "--in-process"])
    assert result["lost"] == 0 and result["identical"] == 32
    assert result["batched_mean_batch"] > 1.5
    assert result["ratio"] > 1.5
