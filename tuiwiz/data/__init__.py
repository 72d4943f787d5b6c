"""Dataset token-length profiling: exact counts with the model's own chat template.

Import cost matters (the CLI's --auto path imports this): nothing here imports torch or
transformers; `tokenizers`, `jinja2` and `pyarrow` are imported only when used.
"""

from __future__ import annotations

from tuiwiz.data.chat_template import DEFAULT_CHAT_TEMPLATE
from tuiwiz.data.encode import EncodedSample, encode_sample, mask_preview, render_sample
from tuiwiz.data.layouts import LAYOUTS, Layout, Sample, detect_layout, iter_conversations
from tuiwiz.data.profile import CutoffStats, LengthProfile, LongSample, profile_dataset
from tuiwiz.data.readers import SkippedRow
from tuiwiz.data.report import cli_progress_printer, render_text_report
from tuiwiz.data.stats import PERCENTILE_RANGE
from tuiwiz.data.tokenizer import CountingTokenizer, HeuristicTokenizer, load_tokenizer
from tuiwiz.demo import DEMO_DATASET

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DEMO_DATASET",
    "LAYOUTS",
    "PERCENTILE_RANGE",
    "CountingTokenizer",
    "CutoffStats",
    "EncodedSample",
    "HeuristicTokenizer",
    "Layout",
    "LengthProfile",
    "LongSample",
    "Sample",
    "SkippedRow",
    "cli_progress_printer",
    "detect_layout",
    "encode_sample",
    "iter_conversations",
    "load_tokenizer",
    "mask_preview",
    "profile_dataset",
    "render_sample",
    "render_text_report",
]
