"""Measured vs estimated on CPU, every setup: what the forward saves and the whole step's peak.

    .venv/bin/python bench/accounting.py [--only saved|step]

Prints the tables behind README's accuracy rows: per setup of tests/test_activations.py, the
bytes the last decoder layer and the rest of the model keep for backward against the estimate's
formulas; per setup of tests/test_step_peak.py, the step's measured peak of live non-weight
bytes against the estimate's non-static terms. `pytest --full` asserts the same setups.
Needs the training stack (`pip install -e '.[train]'`); a few minutes on a 2-core box.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tuiwiz, and the tests' accounting helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _accounting import case_id  # noqa: E402
from test_activations import BATCH, CASES as SAVED_CASES, SEQ, measure_saved  # noqa: E402
from test_step_peak import CASES as STEP_CASES, measure  # noqa: E402

from tuiwiz.planning import activations as act  # noqa: E402


def saved_table() -> None:
    """What one forward leaves alive for backward: the last layer and outside the layers."""
    worst = 0.0
    for case in SAVED_CASES:
        spec, knobs, acc = measure_saved(case)
        gc = knobs.grad_checkpointing
        tokens = BATCH * SEQ
        layer_est = (tokens * act.checkpoint_bytes_per_token(spec, knobs) if gc else
                     tokens * act.layer_saved_bytes_per_token(spec, knobs, SEQ) + act.layer_saved_fixed_bytes(spec, knobs))
        # the last layer's output: kept by nothing under checkpointing on a 16-bit stream
        layer_got = acc.per_layer[0] if gc else acc.per_layer[-1]
        out_est = act.outside_saved_bytes(spec, knobs, BATCH, SEQ)
        e1, e2 = layer_est / layer_got - 1, out_est / acc.other - 1
        worst = max(worst, abs(e1), abs(e2))
        print(f"{case_id(case):55s} layer {layer_got:8d} est {layer_est:8d} ({e1:+.2%})  "
              f"outside {acc.other:7d} est {out_est:7d} ({e2:+.2%})")
    print(f"worst |error|: {worst:.2%}")


def step_table() -> None:
    """The whole step's peak, op by op, against the estimate's non-static terms."""
    worst = 0.0
    for case in STEP_CASES:
        measured, estimated = measure(case)
        err = estimated / measured.peak - 1
        worst = max(worst, abs(err))
        print(f"{case_id(case):55s} measured {measured.peak:12,d} at {measured.peak_phase:15s} "
              f"estimated {estimated:12,d} ({err:+.1%})")
    print(f"worst |error|: {worst:.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("saved", "step"), help="print one table only")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars per setup would bury the table
    if args.only in (None, "saved"):
        print("saved for backward (tests/test_activations.py setups)")
        saved_table()
    if args.only in (None, "step"):
        print("\nwhole-step peak (tests/test_step_peak.py setups)")
        step_table()


if __name__ == "__main__":
    main()
