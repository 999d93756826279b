"""``sdzero localize``: token-level self-localization, where on a first answer the SD-Zero divergence sits.

    sdzero localize teacher=outputs/sft/qwen3_4b_math/stage2 records=[outputs/srt/qwen3_4b_math] device=cuda

At the start of Phase 2 the student and the teacher are the SRT model. The teacher reads
x + body(y) + P_r + y and the student x + y (``distill.batch.build_batch``, the very batch Phase 2
trains on); the per-token divergence D_t between their distributions over the second y is the
training signal. This measures, on the SRT collection's first answers y whose revision y' was
verified correct, how much of that signal falls on the tokens the revision changed:

    differing tokens  the tokens of y outside the matching blocks of difflib.SequenceMatcher(y, y')
                      (on token ids, autojunk off)
    divergence share  sum_{t differing} D_t / sum_t D_t        token share  |differing| / |y|

per sequence, for wrong first answers (P_r = the incorrect phrase) and, as the control, correct
ones (P_r = the correct phrase; present when the collection ran with ``collect.revise_correct``).
A divergence share above the token share means the teacher's signal concentrates where the answer
was revised. Each group reports the means over sequences with 95 % bootstrap intervals, the mean of
the per-sequence ratio and of the difference (divergence share - token share), and how many
sequences were skipped (no differing token, zero total divergence, nothing of y fits the budgets).

One sequence per first answer: a collection keeps up to ``collect.num_revisions`` verified revisions
of the same y, and the first one kept stands for it (the others would count y twice). D_t is the
divergence of ``loss`` (the Phase 2 loss section: kind, weights, temperature, top_k), in float64 on
the selected positions; the forward passes run in ``dtype``. Writes ``localization.json`` (the
numbers, the config and per-token examples) and ``localization.png`` (examples over their text).
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_sdzero.checks import check_output_dir, phrases_of_records
from megatron_sdzero.config import ConfigError, run_config_command, to_dict
from megatron_sdzero.data.formatting import ChatFormat, ControlPhrases
from megatron_sdzero.distill.batch import BatchConfig, DistillBatch, RolloutSample, build_batch
from megatron_sdzero.losses import DistillLossConfig

RESULTS = "localization.json"
FIGURE = "localization.png"
GROUPS = ("wrong", "correct")  # by the first answer's grade; P_r is the incorrect / correct phrase
REQUIRED = {
    "problem_id": str,
    "init_index": int,
    "init_correct": bool,
    "phrase": str,
    "messages": list,
    "y_init_ids": list,
    "y_revised_ids": list,
    "revised_reward": (int, float),
}
PLOT_TOKENS = 160  # tokens of each example drawn, from a little before its first differing token
_FLOAT64_ROW_BYTES = 1 << 27  # bounds the float64 working set of the divergence to a few such buffers


@dataclass
class LocalizeConfig:
    teacher: Path  # HF model directory (or Megatron checkpoint, exported first) of the SRT model
    records: list[Path]  # srt-collect output directories or tuples.jsonl files
    student: Path | None = None  # None: the teacher's model (the start of Phase 2)
    output_dir: Path = Path("outputs/localization")
    max_records: int | None = None  # first answers measured (store order); None: all
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)  # Phase 2's loss section
    # None: the phrases the records were revised with (what Phase 1 trained and Phase 2 checks)
    phrases: ControlPhrases = field(default_factory=ControlPhrases)
    student_max_tokens: int = BatchConfig.student_max_tokens  # Phase 2's batch limits
    teacher_budget: int = BatchConfig.teacher_budget
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"  # forward passes; the divergence is float64
    batch_size: int = 4  # sequences per forward pass
    examples: int = 3  # per-token examples of each group in the JSON and the figure
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.records:
            raise ConfigError("records: give at least one srt-collect output directory or tuples.jsonl")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError(f"max_records: must be >= 1 (or null for all), got {self.max_records}")
        for name in ("batch_size", "student_max_tokens", "teacher_budget"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.examples < 0:
            raise ConfigError(f"examples: must be >= 0, got {self.examples}")

    @property
    def run_dir(self) -> Path:
        return self.output_dir


# --- records ------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """A first answer y and its verified revision y', as token ids."""

    problem_id: str
    init_index: int
    init_correct: bool
    messages: list[dict[str, str]]
    y_ids: list[int]
    revised_ids: list[int]

    @property
    def group(self) -> str:
        return GROUPS[1] if self.init_correct else GROUPS[0]


@dataclass
class LoadedRecords:
    pairs: list[Pair]
    phrases: ControlPhrases  # as the records were revised (None where no record has that outcome)
    records: int  # read
    unverified: int  # revision not graded correct
    repeated: int  # further revisions of a first answer already measured


def load_pairs(paths: Sequence[Path], max_records: int | None = None) -> LoadedRecords:
    """One (y, y') per first answer whose revision was verified correct, in store order."""
    from megatron_sdzero.srt.prepare import tuples_of

    records, seen, pairs, unverified, repeated = [], set(), [], 0, 0
    for path in paths:
        for number, record in enumerate(tuples_of(Path(path), "records"), start=1):
            _check_record(record, path, number)
            records.append(record)
    if not records:
        raise ConfigError(f"records: {', '.join(map(str, paths))} hold no records (an empty collection?)")
    for record in records:
        if record["revised_reward"] <= 0.5:
            unverified += 1
            continue
        key = (record["problem_id"], record["init_index"])
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        pairs.append(_pair(record))
    if not pairs:
        raise ConfigError(f"records: none of the {len(records)} records has a revision verified correct")
    phrases = phrases_of_records(records, "records")
    return LoadedRecords(pairs[:max_records], phrases, len(records), unverified, repeated)


def _check_record(record: Any, path: Path, number: int) -> None:
    if not isinstance(record, dict):
        raise ConfigError(f"records: {path}: record {number} is not a JSON object")
    missing = sorted(k for k in REQUIRED if k not in record)
    if missing:
        raise ConfigError(
            f"records: {path}: record {number} lacks {missing}; expected srt-collect tuples (x, y_init, "
            "P_r, y_revised); a collection with collect.revise=false holds no revisions"
        )
    for key, kind in REQUIRED.items():
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"records: {path}: record {number}: {key} has the wrong type ({value!r:.40})")
    for key in ("y_init_ids", "y_revised_ids"):
        ids = record[key]
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(
                f"records: {path}: record {number}: {key} must be a non-empty list of token ids"
            )


def _pair(record: dict[str, Any]) -> Pair:
    return Pair(
        problem_id=record["problem_id"],
        init_index=record["init_index"],
        init_correct=record["init_correct"],
        messages=record["messages"],
        y_ids=list(record["y_init_ids"]),
        revised_ids=list(record["y_revised_ids"]),
    )


def resolve_localize_phrases(configured: ControlPhrases, recorded: ControlPhrases) -> ControlPhrases:
    """The configured phrases, else the ones the records were revised with."""
    return ControlPhrases(
        correct=configured.correct if configured.correct is not None else recorded.correct,
        incorrect=configured.incorrect if configured.incorrect is not None else recorded.incorrect,
    )


# --- the measurement ----------------------------------------------------------------------------------


def differing_tokens(y_ids: Sequence[int], revised_ids: Sequence[int]) -> list[bool]:
    """For each token of y: whether it lies outside every block y shares with the revision."""
    matcher = difflib.SequenceMatcher(None, list(y_ids), list(revised_ids), autojunk=False)
    differing = [True] * len(y_ids)
    for block in matcher.get_matching_blocks():
        differing[block.a : block.a + block.size] = [False] * block.size
    return differing


def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, config: DistillLossConfig
) -> torch.Tensor:
    """float64 divergence per row of [N, V] logits, as ``config`` defines it (see DistillLossConfig)."""
    rows = max(1, _FLOAT64_ROW_BYTES // (8 * student_logits.shape[-1]))
    parts = [
        _divergence_rows(student_logits[i : i + rows], teacher_logits[i : i + rows], config)
        for i in range(0, student_logits.shape[0], rows)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=student_logits.device)


def _divergence_rows(student: torch.Tensor, teacher: torch.Tensor, config: DistillLossConfig) -> torch.Tensor:
    s = student.double() / config.temperature
    t = teacher.double() / config.temperature
    if config.top_k is not None:
        s, t = _top_k_buckets(s, t, config.top_k, config.top_k_tail)
    lp, lq = s.log_softmax(-1), t.log_softmax(-1)
    if config.kind == "jsd":
        beta = config.jsd_beta
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log(1.0 - beta))
        return beta * _kl(lq, lm) + (1.0 - beta) * _kl(lp, lm)
    w = config.forward_weight
    if w == 0.0:
        return _kl(lp, lq)
    if w == 1.0:
        return _kl(lq, lp)
    return (1.0 - w) * _kl(lp, lq) + w * _kl(lq, lp)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0 log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _top_k_buckets(s: torch.Tensor, t: torch.Tensor, k: int, tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits on the teacher's k most likely ids (and, with ``tail``, one bucket for the rest)."""
    ids = t.topk(min(k, t.shape[-1]), dim=-1).indices
    s_top, t_top = s.gather(-1, ids), t.gather(-1, ids)
    if not tail or ids.shape[-1] == t.shape[-1]:
        return s_top, t_top
    rest = torch.ones_like(t, dtype=torch.bool).scatter_(-1, ids, False)
    s_rest = s.masked_fill(~rest, -torch.inf).logsumexp(-1, keepdim=True)
    t_rest = t.masked_fill(~rest, -torch.inf).logsumexp(-1, keepdim=True)
    return torch.cat([s_top, s_rest], -1), torch.cat([t_top, t_rest], -1)


@dataclass
class Sequenced:
    """One first answer's measurement: D_t and the differing flag of each kept token of y."""

    pair: Pair
    divergences: list[float]  # empty when nothing of y fits the budgets
    differing: list[bool]
    truncated: bool

    @property
    def skip_reason(self) -> str | None:
        if not self.divergences:
            return "nothing_fits"
        if not any(self.differing):
            return "no_differing_tokens"
        if sum(self.divergences) <= 0.0:
            return "zero_divergence"
        return None


def sequence_shares(divergences: Sequence[float], differing: Sequence[bool]) -> tuple[float, float]:
    """(sum of D_t on differing tokens / sum of D_t, differing tokens / tokens)."""
    if len(divergences) != len(differing) or not divergences:
        raise ValueError(
            f"need as many flags as divergences (> 0), got {len(differing)} and {len(divergences)}"
        )
    total = math.fsum(divergences)
    on_differing = math.fsum(d for d, flag in zip(divergences, differing, strict=True) if flag)
    return on_differing / total, sum(differing) / len(differing)


class Localizer:
    """Teacher and student HF models and the Phase 2 batch builder bound to their tokenizer."""

    def __init__(
        self, teacher: Any, student: Any, tokenizer: Any, phrases: ControlPhrases, config: LocalizeConfig
    ):
        self.teacher, self.student = teacher, student
        self.fmt = ChatFormat(tokenizer)
        self.phrases = phrases
        self.loss = config.loss
        self.batch_config = BatchConfig(
            student_max_tokens=config.student_max_tokens,
            teacher_budget=config.teacher_budget,
            correct_only=False,
        )
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.fmt.end_of_turn_id
        self.device = next(teacher.parameters()).device

    def samples(self, pairs: Sequence[Pair]) -> list[RolloutSample]:
        """Phase 2's view of the first answers: prompt ids, y as sampled, and y's grade as the reward."""
        return [
            RolloutSample(
                prompt_ids=self.fmt.prompt_ids(p.messages),
                response_ids=p.y_ids,
                reward=1.0 if p.init_correct else 0.0,
                problem_id=p.problem_id,
            )
            for p in pairs
        ]

    def batch(self, pairs: Sequence[Pair]) -> DistillBatch:
        return build_batch(self.samples(pairs), self.fmt, self.phrases, self.batch_config, self.pad_id)

    @torch.no_grad()
    def measure(self, pairs: Sequence[Pair]) -> list[Sequenced]:
        batch = self.batch(pairs)
        assert batch.teacher_tokens is not None and batch.teacher_index is not None
        student = _selected_logits(self.student, batch.student_tokens, batch.student_index, self.device)
        teacher = _selected_logits(self.teacher, batch.teacher_tokens, batch.teacher_index, self.device)
        mask = batch.loss_mask.to(self.device)
        values = torch.zeros(mask.shape, dtype=torch.float64, device=self.device)
        values[mask] = token_divergence(student[mask], teacher[mask], self.loss)
        results = []
        for b, pair in enumerate(pairs):
            kept = int(batch.loss_mask[b].sum()) if float(batch.sample_weights[b]) > 0 else 0
            if batch.targets[b, :kept].tolist() != pair.y_ids[:kept]:
                raise AssertionError(
                    f"{pair.problem_id}: the batch's targets are not the first answer's tokens"
                )
            results.append(
                Sequenced(
                    pair=pair,
                    divergences=values[b, :kept].tolist(),
                    differing=differing_tokens(pair.y_ids, pair.revised_ids)[:kept],
                    truncated=bool(batch.truncated[b]),
                )
            )
        return results


def _selected_logits(
    model: Any, tokens: torch.Tensor, index: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The model's logits at ``index`` of each row: [B, K, V]. Right padding is never attended to."""
    logits = model(input_ids=tokens.to(device)).logits
    gather = index.to(device)[..., None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, gather)


def measure_all(
    localizer: Localizer, pairs: Sequence[Pair], batch_size: int, bar: Any = None
) -> list[Sequenced]:
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        results += localizer.measure(chunk)
        if bar is not None:
            bar.update(len(chunk))
    return results


# --- the numbers --------------------------------------------------------------------------------------


def summarize_group(results: Iterable[Sequenced]) -> dict[str, Any]:
    """Counts, means with 95 % bootstrap intervals over sequences, and skips, of one group."""
    from megatron_sdzero.eval.metrics import bootstrap_interval

    results = list(results)
    skipped = {reason: 0 for reason in ("no_differing_tokens", "zero_divergence", "nothing_fits")}
    used = []
    for r in results:
        reason = r.skip_reason
        if reason is None:
            used.append(r)
        else:
            skipped[reason] += 1
    summary: dict[str, Any] = {"first_answers": len(results), "sequences": len(used), "skipped": skipped}
    summary["truncated"] = sum(r.truncated for r in used)
    if not used:
        return summary
    shares = [sequence_shares(r.divergences, r.differing) for r in used]
    divergence, tokens = [s[0] for s in shares], [s[1] for s in shares]
    per_sequence = {
        "divergence_share": divergence,
        "token_share": tokens,
        "ratio": [d / t for d, t in shares],
        "excess": [d - t for d, t in shares],  # divergence share - token share
    }
    for name, values in per_sequence.items():
        low, high = bootstrap_interval(values)
        summary[name] = {"mean": _mean(values), "ci95": [low, high]}
    summary["ratio_of_means"] = _mean(divergence) / _mean(tokens)
    summary["pooled_divergence_share"] = math.fsum(
        d for r in used for d, f in zip(r.divergences, r.differing, strict=True) if f
    ) / math.fsum(d for r in used for d in r.divergences)
    summary["pooled_token_share"] = sum(sum(r.differing) for r in used) / sum(len(r.differing) for r in used)
    summary["mean_tokens"] = _mean([len(r.differing) for r in used])
    summary["mean_divergence"] = math.fsum(d for r in used for d in r.divergences) / sum(
        len(r.divergences) for r in used
    )
    return summary


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def examples(results: Sequence[Sequenced], tokenizer: Any, per_group: int) -> list[dict[str, Any]]:
    """The first ``per_group`` measured sequences of each group, token by token."""
    chosen = []
    for group in GROUPS:
        usable = [r for r in results if r.pair.group == group and r.skip_reason is None]
        chosen += usable[:per_group]
    return [_example(r, tokenizer) for r in chosen]


def _example(r: Sequenced, tokenizer: Any) -> dict[str, Any]:
    share, token_share = sequence_shares(r.divergences, r.differing)
    return {
        "group": r.pair.group,
        "problem_id": r.pair.problem_id,
        "init_index": r.pair.init_index,
        "divergence_share": share,
        "token_share": token_share,
        "tokens": [tokenizer.decode([i]) for i in r.pair.y_ids[: len(r.divergences)]],
        "divergence": r.divergences,
        "differing": r.differing,
    }


def plot_examples(path: Path, samples: Sequence[dict[str, Any]], width_chars: int = 100) -> Path:
    """One panel per example: a window of its tokens coloured by D_t, differing tokens underlined."""
    from megatron_sdzero.report import _layout, _pyplot, draw_tokens, save_figure, token_figure_width

    plt = _pyplot()
    windows = [_window(s, PLOT_TOKENS) for s in samples]
    heights = [
        0.6 + 0.28 * max(len(_layout(s["tokens"][a:b], width_chars)), 1)
        for s, (a, b) in zip(samples, windows, strict=True)
    ]
    fig, axes = plt.subplots(
        len(samples), 1, figsize=(token_figure_width(width_chars), sum(heights) + 0.5), dpi=100,
        gridspec_kw={"height_ratios": heights}, squeeze=False,
    )  # fmt: skip
    for ax, sample, (a, b) in zip(axes[:, 0], samples, windows, strict=True):
        draw_tokens(
            ax, sample["tokens"][a:b], sample["divergence"][a:b], width_chars, sample["differing"][a:b], "D_t"
        )
        ax.set_title(
            f"{sample['group']} first answer, problem {sample['problem_id']}: tokens {a}-{b} of "
            f"{len(sample['tokens'])}; divergence share {sample['divergence_share']:.3f}, token share "
            f"{sample['token_share']:.3f} (underlined: changed by the revision)",
            fontsize=8,
        )
    return save_figure(fig, path)


def _window(sample: dict[str, Any], size: int) -> tuple[int, int]:
    first = sample["differing"].index(True)
    start = max(0, min(first - size // 8, len(sample["tokens"]) - size))
    return start, min(len(sample["tokens"]), start + size)


# --- the command --------------------------------------------------------------------------------------


def load_model(path: Path, config: LocalizeConfig) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(config.device).eval().requires_grad_(False)


def hf_directory(path: Path, key: str, export_dir: Path) -> Path:
    """A local HF model directory: ``path``, or the HF export of a Megatron checkpoint there."""
    from megatron_sdzero.eval.run import exported_hf_dir

    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory; give the HF model directory of the SRT model")
    path = exported_hf_dir(path, export_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} holds no config.json; give a Hugging Face model directory")
    return path


def run_localization(config: LocalizeConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from megatron_sdzero.runtime.progress import progress_bar

    loaded = load_pairs(config.records, config.max_records)
    check_output_dir(config.output_dir, "output_dir")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda is not available here; use device=cpu")
    teacher_dir = hf_directory(config.teacher, "teacher", config.output_dir / "hf_teacher")
    student_dir = (
        teacher_dir
        if config.student is None
        else hf_directory(config.student, "student", config.output_dir / "hf_student")
    )
    phrases = resolve_localize_phrases(config.phrases, loaded.phrases)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    vocabulary = _vocabulary(teacher_dir, student_dir)  # checked before any weights are loaded
    _check_token_ids(loaded.pairs, vocabulary)
    teacher = load_model(teacher_dir, config)
    student = teacher if student_dir == teacher_dir else load_model(student_dir, config)
    localizer = Localizer(teacher, student, tokenizer, phrases, config)
    bar = progress_bar(total=len(loaded.pairs), unit="answer", desc="localize", enabled=config.progress)
    with bar:
        results = measure_all(localizer, loaded.pairs, config.batch_size, bar)
    summary = {
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "records": {
            "read": loaded.records,
            "revision_not_verified": loaded.unverified,
            "further_revisions_dropped": loaded.repeated,
            "first_answers_measured": len(loaded.pairs),
        },
        "phrases": {"correct": phrases.correct, "incorrect": phrases.incorrect},
        "groups": {g: summarize_group(r for r in results if r.pair.group == g) for g in GROUPS},
        "examples": examples(results, tokenizer, config.examples),
        "config": to_dict(config),
    }
    config.output_dir.mkdir(parents=True, exist_ok=True)
    (config.output_dir / RESULTS).write_text(json.dumps(summary, indent=1) + "\n")
    if summary["examples"]:
        plot_examples(config.output_dir / FIGURE, summary["examples"])
    return summary


def _vocabulary(teacher_dir: Path, student_dir: Path) -> int:
    """The logit width both models share (their configs' vocab_size)."""
    from transformers import AutoConfig

    teacher, student = (AutoConfig.from_pretrained(str(d)).vocab_size for d in (teacher_dir, student_dir))
    if teacher != student:
        raise ConfigError(f"student: its vocabulary ({student} tokens) is not the teacher's ({teacher})")
    return teacher


def _check_token_ids(pairs: Sequence[Pair], vocabulary: int) -> None:
    for pair in pairs:
        largest = max(max(pair.y_ids), max(pair.revised_ids))
        if largest >= vocabulary:
            raise ConfigError(
                f"records: problem {pair.problem_id} holds token id {largest}, beyond the teacher's "
                f"{vocabulary}-token vocabulary: were the records collected with another model?"
            )


def summary_lines(summary: dict[str, Any]) -> Iterator[str]:
    for group, s in summary["groups"].items():
        skipped = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items() if n)
        line = f"{group} first answers: {s['sequences']} sequences"
        line += f" (skipped: {skipped})" if skipped else ""
        if s["sequences"]:
            line += (
                f"; divergence share {_with_interval(s['divergence_share'])}, token share "
                f"{_with_interval(s['token_share'])}, ratio of means {s['ratio_of_means']:.3f}, "
                f"divergence - token share {_with_interval(s['excess'], '+.4f')}"
            )
        yield line


def _with_interval(stat: dict[str, Any], spec: str = ".4f") -> str:
    low, high = stat["ci95"]
    return f"{stat['mean']:{spec}} [{low:{spec}}, {high:{spec}}]"


def main(argv: Sequence[str] | None = None) -> int:
    def run(config: LocalizeConfig) -> int:
        summary = run_localization(config)
        for line in summary_lines(summary):
            print(f"sdzero localize: {line}")
        figure = f" and {FIGURE}" if summary["examples"] else " (no example to draw)"
        print(f"sdzero localize: results in {config.output_dir / RESULTS}{figure}")
        return 0

    argv = sys.argv[1:] if argv is None else argv
    return run_config_command("sdzero localize", __doc__.split("\n\n")[0], LocalizeConfig, run, argv)
