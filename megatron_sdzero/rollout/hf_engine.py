"""CPU rollout engine: batched decoding with a transformers model and a KV cache.

It runs its own sampling loop (rather than ``model.generate``) for one reason: every sequence has
its own ``torch.Generator``, seeded from the request's seed and the sample index, so a prompt's
samples do not depend on what else is in the batch. That is what lets a killed ``srt-collect`` run
resume and reproduce exactly the samples an uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_sdzero.rollout.base import Completion, RolloutConfig, SamplingParams, mix_seed, per_prompt


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None


class HFEngine:
    def __init__(self, model_path: str | Path, config: RolloutConfig) -> None:
        from transformers import AutoTokenizer

        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.model_path = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = self._load(model_path)

    def _load(self, path: str | Path) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(self.config.device).eval()
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self._eos_ids = {i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(self._eos_ids, default=0)
        return model

    def reload(self, hf_dir: str | Path) -> None:
        self.model = self._load(hf_dir)
        self.model_path = Path(hf_dir)

    @torch.no_grad()
    def load_weights(self, pairs: Iterable[tuple[str, torch.Tensor]], bucket_mb: int = 0) -> int:
        """Copy HF-named tensors into the live model (in-memory refresh); every parameter must arrive."""
        state = self.model.state_dict()
        seen = set()
        for name, tensor in pairs:
            if name not in state:
                raise KeyError(f"the rollout model has no tensor {name}")
            if state[name].shape != tensor.shape:
                raise ValueError(
                    f"{name}: engine shape {tuple(state[name].shape)}, sent {tuple(tensor.shape)}"
                )
            state[name].copy_(tensor)
            seen.add(name)
        missing = {n for n, _ in self.model.named_parameters()} - seen
        if missing:
            raise KeyError(f"refresh left rollout parameters unchanged: {sorted(missing)[:5]}...")
        return len(seen)

    def close(self) -> None:
        self.model = None

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        rows, owners = [], []
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt(prompts, params), strict=True)):
            for j in range(p.n):
                rows.append(self._row(prompt, p, j))
                owners.append(i)
        step = max(1, self.config.batch_size)
        for start in range(0, len(rows), step):
            self._decode(rows[start : start + step])
        outputs: list[list[Completion]] = [[] for _ in prompts]
        for owner, row in zip(owners, rows, strict=True):
            outputs[owner].append(self._completion(row))
        return outputs

    def _row(self, prompt: Sequence[int], params: SamplingParams, index: int) -> _Row:
        room = self.config.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under max_model_len")
        seed = mix_seed(params.seed, index) if params.seed is not None else int.from_bytes(os.urandom(4))
        generator = torch.Generator(device=self.config.device).manual_seed(seed)
        return _Row(list(prompt), params, generator, min(params.max_tokens, room))

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> None:
        device = self.config.device
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):  # left padding: every row's last prompt token is at -1
            ids[k, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[k, width - len(row.prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        for _ in range(max(r.max_tokens for r in rows)):
            logits = out.logits[:, -1, :].float()
            next_ids = torch.tensor([self._step(row, logits[k]) for k, row in enumerate(rows)], device=device)
            if all(row.finish_reason for row in rows):
                break
            alive = torch.tensor([row.finish_reason is None for row in rows], device=device, dtype=torch.long)
            mask = torch.cat([mask, alive[:, None]], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=next_ids[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )

    def _step(self, row: _Row, logits: torch.Tensor) -> int:
        """Sample row's next token (if it is still running); return the id to feed next."""
        if row.finish_reason:
            return self._pad_id
        token = _sample(logits, row.params, row.generator)
        row.tokens.append(token)
        if row.params.logprobs:
            row.logprobs.append(torch.log_softmax(logits, dim=-1)[token].item())
        if token in self._eos_ids or token in row.params.stop_token_ids:
            row.finish_reason = "stop"
        elif row.params.stop and self._hit_stop_string(row):
            row.finish_reason = "stop"
        elif len(row.tokens) >= row.max_tokens:
            row.finish_reason = "length"
        return token

    def _hit_stop_string(self, row: _Row) -> bool:
        # A new stop string must end in the last few tokens (a character spans at most 4 byte tokens).
        window = 4 * max(len(stop) for stop in row.params.stop) + 4
        recent = self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True)
        if not any(stop in recent for stop in row.params.stop):
            return False
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        row.text = text[: min(text.find(stop) for stop in row.params.stop if stop in text)]
        return True

    def _completion(self, row: _Row) -> Completion:
        text = (
            row.text if row.text is not None else self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        )
        return Completion(
            token_ids=row.tokens,
            text=text,
            finish_reason=row.finish_reason or "length",
            logprobs=row.logprobs if row.params.logprobs else None,
        )


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalise."""
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly ahead of each token
    sorted_probs[before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()
