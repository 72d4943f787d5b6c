"""When a run evaluates and saves: one rule for tuiwiz's own worker and every exported config."""

from __future__ import annotations

from tuiwiz.planning.knobs import TrainingKnobs


#: Checkpoints the trainer keeps without early stopping (with it, every one: the best may be any).
SAVE_TOTAL_LIMIT = 3


def early_stopping_on(knobs: TrainingKnobs, has_eval: bool) -> bool:
    """Early stopping watches eval_loss, so it only runs when there is a validation split."""
    return bool(knobs.early_stopping_patience) and has_eval


def eval_and_save_steps(knobs: TrainingKnobs, has_eval: bool) -> tuple[int, int]:
    """(eval_steps, save_steps) as the run uses them.

    No eval_steps means "evaluate when saving". With early stopping the best adapter is kept
    (transformers' load_best_model_at_end), which needs a save on every evaluation step, so
    saves move onto the eval steps when save_steps is not a multiple of them.
    """
    eval_steps = knobs.eval_steps or knobs.save_steps
    save_steps = knobs.save_steps
    if early_stopping_on(knobs, has_eval) and save_steps % eval_steps:
        save_steps = eval_steps
    return eval_steps, save_steps
