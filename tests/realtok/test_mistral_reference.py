"""Mistral: our reference labels and the two HF templates against Mistral's own encoder (mistral-common).

The supervised tokens of every assistant turn under the marked Mistral Nemo template must be exactly the
tokens mistral-common writes for that message. Whole-conversation ids are compared too; where a template
differs from mistral-common, the table below says how, and the test checks that it is that difference.
"""

from __future__ import annotations

import pytest
from conversations import BY_NAME, RECORDS, Record
from reference_labels import expected_labels, supervised_spans

pytest.importorskip("mistral_common", reason="mistral-common (a test dependency, dev extra) is not installed")

from mistral_reference import hf_tokenizer, mistral_tokenizer, reference_assistant_spans, reference_ids  # noqa: E402

# mistral-common refuses these (its validation: a system message only first; an assistant message needs
# content or tool calls; reasoning is a ThinkChunk that instruct v3 does not accept)
REFUSED = {"system_mid_conversation", "empty_assistant", "reasoning_content", "think_then_tool"}
SAME, RAISES = "same", "raises"
SYSTEM_DROPPED = "system prompt dropped"  # the npm Nemo template renders it only when the last message is a user's
TOOL_JSON = "tool result kept as a string"  # mistral-common embeds a JSON tool result as an object
# (template, record) -> how the template's ids compare with mistral-common's, for the records it accepts
OUTCOME: dict[str, dict[str, str]] = {
    "official": {"assistant_first": RAISES, "tool_call": TOOL_JSON, "tool_call_empty_content": TOOL_JSON,
                 "two_tool_calls": TOOL_JSON},
    "nemo_npm": {"assistant_first": RAISES, "system_multi_turn": SYSTEM_DROPPED, "long_turns": SYSTEM_DROPPED,
                 "tool_call": SYSTEM_DROPPED},
}
ACCEPTED = [r for r in RECORDS if r.name not in REFUSED]


@pytest.fixture(scope="module")
def mt():
    return mistral_tokenizer()


@pytest.fixture(scope="module")
def templates(real_tokenizer) -> dict:
    return {"official": hf_tokenizer(), "nemo_npm": real_tokenizer("mistral_nemo")}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_mistral_common_refuses(mt, name: str) -> None:
    rec = BY_NAME[name]
    with pytest.raises(Exception, match="Unexpected role|must have either content|Unexpected content chunk"):
        reference_ids(mt, rec.messages, rec.tools)


def test_same_vocabulary(mt, templates) -> None:
    text = "Hello world — 你好 👋🏽 ½ INST s"  # plain text: HF tokenizers split special-token strings out of text
    ids = mt.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    assert templates["official"](text, add_special_tokens=False).input_ids == ids
    assert templates["nemo_npm"](text, add_special_tokens=False).input_ids == ids


@pytest.mark.parametrize("template", list(OUTCOME))
@pytest.mark.parametrize("rec", ACCEPTED, ids=lambda r: r.name)
def test_whole_conversation_ids(mt, templates, template: str, rec: Record) -> None:
    tok = templates[template]
    ref = reference_ids(mt, rec.messages, rec.tools)
    outcome = OUTCOME[template].get(rec.name, SAME)
    if outcome == RAISES:  # mistral-common gives the opening assistant turn an empty [INST][/INST]
        with pytest.raises(Exception, match="alternate|must start with a user"):
            tok.apply_chat_template(rec.messages, tools=rec.tools, tokenize=False)
        assert tok.decode(ref[:3]) == "<s>[INST][/INST]"
        return
    ids = tok.apply_chat_template(rec.messages, tools=rec.tools, tokenize=True, return_dict=False)
    if outcome == SAME:
        assert ids == ref
    elif outcome == SYSTEM_DROPPED:
        system = rec.messages[0]["content"]
        assert system in tok.decode(ref) and system not in tok.decode(ids)
    else:
        assert outcome == TOOL_JSON
        assert '[TOOL_RESULTS]{"content": {' in tok.decode(ref)
        assert '[TOOL_RESULTS]{"content": "{\\"' in tok.decode(ids)


@pytest.mark.parametrize("rec", [r for r in ACCEPTED if r.expected["mistral_nemo"] != "raises"], ids=lambda r: r.name)
def test_reference_labels_are_what_mistral_common_writes_for_each_answer(mt, real_tokenizer, rec: Record) -> None:
    tok = real_tokenizer("mistral_nemo")
    ids, labels = expected_labels(tok, rec.messages, "mistral_nemo", tools=rec.tools, **rec.kwargs)
    assert supervised_spans(ids, labels) == reference_assistant_spans(mt, rec.messages, rec.tools)
