"""Chat template rendering: the reference's renderings (transformers apply_chat_template) and error cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import golden

from s1serve.assets import ASSETS_DIR
from s1serve.tokenizer import ChatTemplate, ChatTemplateError, Tokenizer, load_tokenizer

CHAT_CASES = golden("chat_golden")["cases"]
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("case", CHAT_CASES, ids=[c["name"] for c in CHAT_CASES])
def test_rendering_matches_reference(tokenizer: Tokenizer, case: dict) -> None:
    rendered = tokenizer.apply_chat_template(case["messages"], tools=case["tools"], **case["kwargs"])
    assert rendered == case["rendered"]


def test_generation_prompt_is_on_by_default(tokenizer: Tokenizer) -> None:
    assert tokenizer.apply_chat_template(USER).endswith("<|im_start|>assistant\n<think>")
    assert tokenizer.apply_chat_template(USER, enable_thinking=False).endswith("<think></think>\n\n")
    assert tokenizer.apply_chat_template(USER, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_content_none_renders_as_empty(tokenizer: Tokenizer) -> None:
    """OpenAI clients send content null on assistant turns that only call tools (transformers fails there)."""
    call = {"function": {"name": "f", "arguments": {"x": 1}}}
    with_none = USER + [{"role": "assistant", "content": None, "tool_calls": [call]}]
    with_empty = USER + [{"role": "assistant", "content": "", "tool_calls": [call]}]
    assert tokenizer.apply_chat_template(with_none) == tokenizer.apply_chat_template(with_empty)


@pytest.mark.parametrize(
    "messages, match",
    [([], "non-empty"), ("hello", "non-empty"), ([{"content": "x"}], "role"), ([["user", "x"]], "role")],
)
def test_malformed_messages_are_rejected(tokenizer: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        tokenizer.apply_chat_template(messages)  # type: ignore[arg-type]


def test_tools_must_be_schemas(tokenizer: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="tools"):
        tokenizer.apply_chat_template(USER, tools=[len])  # type: ignore[list-item]


def test_template_errors_become_chat_template_errors() -> None:
    template = ChatTemplate("{{ raise_exception('no system role here') }}")
    with pytest.raises(ChatTemplateError, match="no system role here"):
        template.render(USER)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% if %}")
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for m in messages %}{{ m.content.nope.deeper }}{% endfor %}").render(USER)


def test_environment_is_sandboxed_and_immutable() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(USER)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.append(1) }}").render(USER)


def test_transformers_extras_are_available() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}|{{ strftime_now('%Y') | length }}"
        "|{{ bos_token }}"
    )
    rendered = template.render([{"role": "user", "content": "<é>&"}, {"role": "user", "content": "second"}],
                               bos_token="<s>")
    assert rendered == '{"role": "user", "content": "<é>&"}|4|<s>'


def test_trim_and_lstrip_blocks() -> None:
    template = ChatTemplate("  {% if true %}\nA\n  {% endif %}\nB")
    assert template.render(USER) == "A\nB"


def test_named_templates() -> None:
    both = ChatTemplate({"default": "plain", "tool_use": "tools"})
    assert both.render(USER) == "plain"
    assert both.render(USER, tools=[{"type": "function"}]) == "tools"
    with pytest.raises(ChatTemplateError, match="default"):
        ChatTemplate({"a": "x", "b": "y"}).render(USER)


def _copy_assets(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(ASSETS_DIR, folder, ignore=shutil.ignore_patterns("__*"))
    return folder


def test_checkpoint_template_file_wins_over_the_vendored_one(tmp_path: Path) -> None:
    folder = _copy_assets(tmp_path)
    (folder / "chat_template.jinja").write_text("custom:{{ messages[0].content }}", encoding="utf-8")
    assert load_tokenizer(folder).apply_chat_template(USER) == "custom:hi"


def test_template_from_tokenizer_config_when_no_jinja_file(tmp_path: Path) -> None:
    folder = _copy_assets(tmp_path)
    source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": source}), encoding="utf-8")
    loaded = load_tokenizer(folder)
    for case in CHAT_CASES:
        rendered = loaded.apply_chat_template(case["messages"], tools=case["tools"], **case["kwargs"])
        assert rendered == case["rendered"]


def test_no_template_at_all(tmp_path: Path) -> None:
    folder = _copy_assets(tmp_path)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_tokenizer(folder).apply_chat_template(USER)
