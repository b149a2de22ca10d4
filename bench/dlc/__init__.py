"""DLC-Bench scoring: the published judge protocol (prompts, answer parsing, region scores)
run against an OpenAI-compatible LLM judge with many requests in flight."""

from bench.dlc.judge import Judge, OpenAIJudge
from bench.dlc.parsing import parse_answer
from bench.dlc.protocol import build_prompt, recognition_question
from bench.dlc.scoring import DlcResult, score_dlc

__all__ = [
    "DlcResult",
    "Judge",
    "OpenAIJudge",
    "build_prompt",
    "parse_answer",
    "recognition_question",
    "score_dlc",
]
