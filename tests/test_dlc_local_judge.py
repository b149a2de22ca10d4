"""The local transformers judge: a tiny random Llama with a word-level chat tokenizer answers
protocol prompts, concurrent calls share one `generate`, and dlc-score runs end to end on it."""

import asyncio
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from bench.dlc.judge import Judge
from bench.dlc.local_judge import TransformersJudge
from bench.dlc.protocol import build_prompt
from bench.dlc.scoring import main as score_main
from dam.errors import DamInputError
from dam.modeling.sizes import tiny_llama_config
from tests.factories import tiny_tokenizer

CHOICES = [["Red.", 1], ["Blue.", 0], ["Green.", -1]]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge") / "llm"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _prompts(n):
    return [build_prompt(f"a red circle {i} .", f"what color is object {i} ?", CHOICES) for i in range(n)]


def test_answers_are_strings_and_concurrent_calls_share_generate(judge_dir):
    judge = TransformersJudge(judge_dir, "cpu", "float32", batch_size=4, max_new_tokens=6)
    assert isinstance(judge, Judge)
    text = judge.chat_text("hello")
    assert text.endswith("<s> assistant :") and "user : hello" in text

    async def run():
        try:
            return await asyncio.gather(*(judge.answer(p) for p in _prompts(10)))
        finally:
            await judge.aclose()

    answers = asyncio.run(run())
    assert len(answers) == 10 and all(isinstance(a, str) for a in answers)
    # 10 concurrent calls, at most 4 per generate: 3 generate calls, not 10.
    assert judge.generate_calls == 3 and sorted(judge.batch_sizes) == [2, 4, 4]

    # Left padding and batching do not change greedy answers: one at a time gives the same.
    single = [judge.generate([p])[0] for p in _prompts(3)]
    assert single == answers[:3]


def test_sequential_calls_do_not_wait_for_a_full_batch(judge_dir):
    judge = TransformersJudge(judge_dir, "cpu", "float32", batch_size=32, max_new_tokens=3)

    async def run():
        try:
            return [await judge.answer(p) for p in _prompts(2)]
        finally:
            await judge.aclose()

    assert len(asyncio.run(run())) == 2
    assert judge.batch_sizes == [1, 1]


def test_bad_judge_path_and_template_are_clear_errors(tmp_path, judge_dir):
    with pytest.raises(DamInputError, match="not a transformers model folder"):
        TransformersJudge(tmp_path / "absent")
    plain = tmp_path / "plain"
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tiny_tokenizer()))).save_pretrained(plain)
    tiny_tokenizer(chat_template=False).save_pretrained(plain)
    with pytest.raises(DamInputError, match="no chat template"):
        TransformersJudge(plain)
    with pytest.raises(DamInputError, match="--judge-dtype"):
        TransformersJudge(judge_dir, dtype="float13")


def test_dlc_score_end_to_end_with_the_local_judge(tmp_path, judge_dir, capsys):
    qa = {str(i): [{"question": f"Q{i} color?", "choices": CHOICES, "type": "positive"},
                   {"question": f"Q{i} text?", "choices": [["No text.", 1], ["Text.", -1]], "type": "negative"}]
          for i in range(3)}
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    (tmp_path / "class_names.json").write_text(json.dumps({"0": "mug", "1": "cups", "2": "bus"}))
    (tmp_path / "preds.json").write_text(json.dumps({a: "a red mug ." for a in qa}))
    out = tmp_path / "eval.json"
    args = ["--pred", str(tmp_path / "preds.json"), "--data-root", str(tmp_path), "--judge-path", str(judge_dir),
            "--judge-device", "cpu", "--judge-dtype", "float32", "--out", str(out), "--no-progress"]
    assert score_main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("DLC-Bench: pos=")
    data = json.loads(out.read_text())
    assert all(len(data[a]["response"]) == 3 and all(isinstance(r, str) for r in data[a]["response"]) for a in qa)

    # --base-url and --judge-path exclude each other.
    with pytest.raises(SystemExit) as exc:
        score_main([*args, "--base-url", "http://127.0.0.1:9/v1"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
