"""Chat-template rendering that is byte-identical to transformers' `apply_chat_template`.

Why not call transformers: importing it costs seconds and can pull in torch; the planning
core must stay light. The jinja environment below mirrors
`transformers.utils.chat_template_utils._cached_compile_jinja_template` (v5.23):
sandboxed, trim_blocks + lstrip_blocks, loopcontrols, a `tojson` filter that does not
HTML-escape, `raise_exception`, `strftime_now`, a safe `dict` and `namespace`. The test
suite checks the result against transformers itself on every shared dataset/tokenizer.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

# Default format for base models that ship no chat template (documented in docs/dataset.md):
# ChatML turns, tools as a JSON list in the system turn, and the tokenizer's EOS after every
# assistant turn so a base model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% if tools %}<|im_start|>system\n"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "Tools:\n{{ tools | tojson }}<|im_end|>\n"
    "{% set loop_messages = messages[1:] if messages and messages[0].role == 'system' else messages %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "<|im_start|>{{ message.role }}\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ (call.function if call.function is defined else call) | tojson }}{% endfor %}{% endif %}"
    "{% if message.role == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateError(Exception):
    """The chat template refused a conversation (its own `raise_exception`, or a jinja error)."""


class TemplateSyntaxError(TemplateError):
    """The chat template's text does not compile: a fault of the template, not of any sample."""

    def __init__(self, lineno: int | None, message: str) -> None:
        self.lineno, self.message = lineno, message
        super().__init__(f"syntax error at line {lineno}: {message}" if lineno else f"syntax error: {message}")


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """Compile once per template text: compiling is ~100x the cost of one render."""
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class GenerationTag(jinja2.ext.Extension):
        """Accept `{% generation %}` blocks (render their body unchanged), as transformers does."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

        def _passthrough(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateSyntaxError(e.lineno, e.message or "invalid template") from None


def render(
    template: Any,
    messages: list[dict[str, Any]],
    *,
    tools: list[Any] | None,
    special: dict[str, Any],
    add_generation_prompt: bool = False,
) -> str:
    """Render one conversation. `special` carries bos_token/eos_token/... like transformers'
    `special_tokens_map`. Errors from the template become `TemplateError`."""
    import jinja2

    try:
        return template.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **special
        )
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(str(e) or type(e).__name__) from None
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        raise TemplateError(f"{type(e).__name__}: {e}") from None
