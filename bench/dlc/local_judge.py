"""A DLC-Bench judge run in-process with transformers, for machines without a vLLM server.

`TransformersJudge` loads a causal LM and its tokenizer from a local folder and answers each
protocol prompt as an OpenAI-compatible server would: the tokenizer's chat template applied to
the single user message (generation prompt added, no extra special tokens), greedy decoding
(the protocol's temperature 0, top_p 1 and zero penalties are exactly greedy), at most 300 new
tokens. Scoring asks all questions at once; concurrent `answer` calls are gathered (for a few
milliseconds, or until `batch_size` are waiting) into one left-padded `generate`, run in a
worker thread so that the event loop keeps collecting the next batch meanwhile.

    dam-bench dlc-score --pred preds.json --data-root DLC-bench --judge-path path/to/Llama-3.1-8B-Instruct \
        --judge-device cuda --judge-dtype bfloat16 --out eval.json
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from dam.errors import DamInputError

from bench.dlc.protocol import JUDGE_PARAMS

logger = logging.getLogger(__name__)


class TransformersJudge:
    """A local transformers chat model as the DLC-Bench judge (implements `Judge`).

    Args:
        model_path: folder with a causal LM and a tokenizer that has a chat template.
        device: torch device, e.g. "cuda" or "cpu".
        dtype: torch dtype name ("bfloat16", ...) or None for the checkpoint's own.
        batch_size: most prompts per `generate`.
        max_new_tokens: answer length limit (the protocol's max_tokens, 300).
        collect_ms: how long the first waiting prompt waits for others to share its batch.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        batch_size: int = 32,
        *,
        max_new_tokens: int = JUDGE_PARAMS["max_tokens"],
        collect_ms: float = 5.0,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise DamInputError(f"--judge-batch-size must be at least 1, got {batch_size}")
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise DamInputError(
                f"--judge-path {model_path} is not a transformers model folder (no config.json); "
                "pass the local folder of an instruction-tuned causal LM"
            )
        torch_dtype: Any = "auto"
        if dtype is not None:
            torch_dtype = getattr(torch, dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise DamInputError(f"unknown --judge-dtype {dtype!r}: use float32, bfloat16 or float16")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        except (OSError, ValueError) as exc:
            raise DamInputError(f"could not load a judge model from {model_path}: {exc}") from exc
        if not getattr(self.tokenizer, "chat_template", None):
            raise DamInputError(
                f"the tokenizer in {model_path} has no chat template; the judge must be a chat (instruct) model"
            )
        self.tokenizer.padding_side = "left"  # generation continues every row at the same position
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.collect_s = collect_ms / 1000
        self.generate_calls = 0
        self.batch_sizes: list[int] = []
        self._pending: list[tuple[str, asyncio.Future[str]]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    def chat_text(self, prompt: str) -> str:
        """The model's input for one prompt: the chat template over one user message."""
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy answers to `prompts` with one left-padded `generate` (blocking)."""
        import torch

        texts = [self.chat_text(p) for p in prompts]
        # The chat template already holds the BOS token where the model wants one.
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        self.generate_calls += 1
        self.batch_sizes.append(len(prompts))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, new)
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    async def answer(self, prompt: str) -> str:
        """The judge's answer to one prompt; concurrent calls share `generate` calls."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future: asyncio.Future[str] = loop.create_future()
        self._pending.append((prompt, future))
        assert self._wake is not None
        self._wake.set()
        return await future

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            if len(self._pending) < self.batch_size:
                await asyncio.sleep(self.collect_s)  # let concurrent callers join this batch
            batch = [(p, f) for p, f in self._pending[: self.batch_size] if not f.cancelled()]
            del self._pending[: self.batch_size]
            if not self._pending:
                self._wake.clear()
            if not batch:
                continue
            try:
                answers = await asyncio.to_thread(self.generate, [p for p, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # e.g. out of memory: every caller of this batch sees it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), text in zip(batch, answers):
                if not future.done():
                    future.set_result(text)

    async def aclose(self) -> None:
        """Stop the batching task (the model stays loaded; the judge can be used again)."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
