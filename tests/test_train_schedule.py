"""The eval/save schedule rule, checked against transformers' own validation of TrainingArguments."""

from __future__ import annotations

import itertools

import pytest

from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.schedule import early_stopping_on, eval_and_save_steps

CASES = list(itertools.product([10, 25, 100], [None, 4, 10, 50], [None, 3], [True, False]))


@pytest.mark.parametrize("save,evals,patience,has_eval", CASES)
def test_the_schedule_keeps_what_was_asked_unless_early_stopping_needs_aligned_saves(
        save: int, evals: int | None, patience: int | None, has_eval: bool) -> None:
    knobs = TrainingKnobs(save_steps=save, eval_steps=evals, early_stopping_patience=patience)
    eval_steps, save_steps = eval_and_save_steps(knobs, has_eval)
    assert eval_steps == (evals or save)  # no eval_steps: evaluate when saving
    if early_stopping_on(knobs, has_eval):
        assert save_steps % eval_steps == 0
        assert save_steps in (save, eval_steps)
    else:
        assert save_steps == save


def test_early_stopping_needs_a_validation_split() -> None:
    knobs = TrainingKnobs(early_stopping_patience=2)
    assert early_stopping_on(knobs, True) and not early_stopping_on(knobs, False)
    assert not early_stopping_on(TrainingKnobs(), True)


@pytest.mark.parametrize("save,evals,patience,has_eval", CASES)
def test_transformers_accepts_every_schedule_the_worker_builds(save: int, evals: int | None, patience: int | None,
                                                              has_eval: bool, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from tuiwiz.train.build import sft_config

    knobs = TrainingKnobs(save_steps=save, eval_steps=evals, early_stopping_patience=patience)
    args = sft_config(knobs, tmp_path, device="cpu", has_eval=has_eval, dtype=torch.bfloat16)  # validates
    eval_steps, save_steps = eval_and_save_steps(knobs, has_eval)
    assert args.load_best_model_at_end == early_stopping_on(knobs, has_eval)
    assert args.save_steps == save_steps
    if has_eval:
        assert args.eval_steps == eval_steps


def test_without_the_rule_transformers_refuses_unaligned_saves(tmp_path) -> None:
    """The control: what the rule prevents is a real refusal, not a style choice."""
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="multiple of the evaluation"):
        TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=4, save_strategy="steps",
                          save_steps=10, load_best_model_at_end=True, use_cpu=True)
