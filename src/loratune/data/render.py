"""The one place that turns a conversation (or a plain text) into token ids and labels.

The conversation is rendered once, whole, by the chat template (the same Jinja renderer as
`tokenizer.apply_chat_template`), and tokenized once. Labels mark, for each trained assistant message,
the characters the model has to produce in that very rendering: what the template writes for the
message (its content, reasoning, tool calls, and any text the template puts inside the turn such as an
empty `<think></think>` block) and the end-of-turn text that closes it, nothing of the next header.
No template is asked to be prefix-stable and no marker string is searched for in the conversation:

1. A template with `{% generation %}` markers says itself which characters an assistant produces; those
   spans are the labels (the renderer's own assistant-mask mechanism), unless a message's text is missing
   from the rendering, which the steps below handle.
2. Otherwise each message's place in the rendering is found by rendering the conversation again with that
   one message's content replaced by a probe (private-use characters that never occur in it) and
   comparing the two renderings: what differs is what the template wrote for that message, wherever the
   template puts it (Mistral writes the system prompt into the last user turn, DeepSeek moves system
   messages to the front, Qwen3 renders reasoning only after the last user query). A message whose probe
   changes nothing is left out by the template, which is an error rather than silent data loss.
3. An assistant turn then reaches back over template text between the generation prompt and the content
   (Qwen3's `<think>\n\n</think>\n\n`), looked for only in the stretch of template text after the
   previous message, and forward over the end-of-turn text (`ChatTemplate.stop`), which must follow.
   If another message's text falls inside that turn, supervision would be ambiguous: an error names the
   template and what to change.
   A template that writes a message only into a prompt (Mistral's put the system prompt into the user turn
   that ends the conversation, so it is lost from a conversation that ends with an answer) is rendered as
   that prompt, up to the last user turn, followed by the answers after it, as Mistral's own tokenizer
   library builds training text.
4. The text is tokenized with character offsets and the tokens that overlap a span are supervised.

Exactly one BOS: the text is tokenized without special tokens; BOS is prepended when the tokenizer adds
one to plain text and the template did not render it, and a sequence with two is rejected. The first
token never carries a label (nothing predicts it), which also keeps packed samples independent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from loratune.data.templates import ChatTemplate, render_text
from loratune.model.load import TokenizerInfo

IGNORE = -100

Span = tuple[int, int]
_PROBES = ("\ue000\ue001", "\ue002\ue003", "\ue004\ue005")  # private-use pairs; one absent from the message
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RenderError(ValueError):
    """A conversation cannot be rendered into labels; the caller adds the file and row."""


@dataclass
class Plan:
    """Rendered text and the character spans [start, end) that carry loss."""

    text: str
    spans: list[Span]


def _render(tokenizer, template: ChatTemplate, messages: list[dict], gen: bool, tools: list | None) -> str:
    try:
        return render_text(tokenizer, template.jinja, messages, add_generation_prompt=gen, tools=tools,
                           variables=template.variables)
    except Exception as e:  # jinja's raise_exception and template bugs: report the template's own words
        raise RenderError(f"{template.label} rejected the conversation: {e}") from None


def has_generation_markers(jinja: str) -> bool:
    """Whether a template marks the assistant's text with `{% generation %}` blocks."""
    return bool(_GENERATION.search(jinja))


def plan_conversation(messages: list[dict], template: ChatTemplate, tokenizer, train_on: str = "assistant",
                      tools: list | None = None) -> Plan:
    """Render `messages` once and locate the supervised character spans (see the module docstring)."""
    full = _render(tokenizer, template, messages, False, tools)
    _check_tools_kept(full, messages, tools, template)
    if train_on == "all":
        return Plan(full, [(0, len(full))])
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        trained = trained[-1:]
    if not trained:
        return Plan(full, [])
    if has_generation_markers(template.jinja) and all(
            m["role"] == "assistant" or m["content"].strip() in full for m in messages):
        return Plan(full, _marked_spans(full, messages, template, tokenizer, tools, train_on))
    r = _Renderer(template, tokenizer, tools)
    regions = r.regions(full, messages, False)
    dropped = [j for j, (m, g) in enumerate(zip(messages, regions))
               if g is None and m["role"] != "assistant" and m["content"].strip()]
    if dropped:
        return r.prompt_then_answers(full, messages, regions, dropped, trained)
    return Plan(full, r.spans(full, messages, regions, trained))


@dataclass(frozen=True)
class _Renderer:
    """Renderings of one record's conversation with its template, tokenizer and tools."""

    template: ChatTemplate
    tokenizer: object
    tools: list | None

    def render(self, messages: list[dict], gen: bool) -> str:
        return _render(self.tokenizer, self.template, messages, gen, self.tools)

    def regions(self, text: str, messages: list[dict], gen: bool) -> list[Span | None]:
        """Where the template wrote each message in `text` (`messages` rendered with generation prompt `gen`)."""
        return [_region(text, self.probed(messages, j, gen)) for j in range(len(messages))]

    def probed(self, messages: list[dict], j: int, gen: bool) -> str:
        """The conversation rendered with message j replaced by the first of its probes the template accepts."""
        variants = _probes(messages[j])
        for k, probe in enumerate(variants):
            try:
                return self.render([*messages[:j], probe, *messages[j + 1:]], gen)
            except RenderError:
                if k == len(variants) - 1:
                    raise
        raise AssertionError("unreachable: a message has at least one probe")

    def spans(self, text: str, messages: list[dict], regions: list[Span | None], trained: list[int],
              left_out: tuple[int, ...] = ()) -> list[Span]:
        """The supervised span of each trained assistant message in `text` (see `_turn`); `left_out` are
        messages `text` was rendered without, also left out of the prompts compared with it."""
        stop = self.template.stop_text(self.tokenizer.eos_token)
        gen = generation_prompt(self.tokenizer, self.template)
        spans = []
        for i in trained:
            try:  # the prompt inference would show before this turn, when the rendering starts with it
                prompt = self.render([m for j, m in enumerate(messages[:i]) if j not in left_out], True)
            except RenderError:  # e.g. a template that cannot render an empty conversation
                prompt = None
            spans.append(_turn(text, messages, regions, i, stop, self.tokenizer.eos_token, gen, prompt, self.template))
        return spans

    def prompt_then_answers(self, full: str, messages: list[dict], regions: list[Span | None], dropped: list[int],
                            trained: list[int]) -> Plan:
        """For a template that writes some message only into a prompt (Mistral's put the system prompt into the
        user turn that ends the conversation, so a conversation ending with an answer loses it): the conversation up
        to its last user turn rendered as the prompt it is, then the answers after it as the whole rendering has them
        (what Mistral's own tokenizer library does for training)."""
        last_user = max((j for j, m in enumerate(messages) if m["role"] == "user"), default=-1)
        head_messages = messages[:last_user + 1]
        head = self.render(head_messages, True) if last_user >= 0 and max(dropped) < last_user else ""
        head_regions = self.regions(head, head_messages, True) if head else []
        lost = [j for j in dropped if not head or head_regions[j] is None]
        if lost:
            m = messages[lost[0]]
            raise RenderError(f"{self.template.label} leaves out message {lost[0]} ({m['role']}): its text is not in "
                              f"the rendering; use a template that renders {m['role']} messages")
        base = self.render([m for j, m in enumerate(head_messages) if j not in dropped], True)
        if not full.startswith(base):
            raise RenderError(f"{self.template.label} writes message {dropped[0]} ({messages[dropped[0]]['role']}) only "
                              "into a prompt and renders the answers after it differently, so the training text is "
                              "ambiguous; end the conversation with its last user turn, or set data.template")
        spans = self.spans(head, head_messages, head_regions, [i for i in trained if i < last_user])
        shift = len(head) - len(base)
        tail = self.spans(full, messages, regions, [i for i in trained if i > last_user], tuple(dropped))
        return Plan(head + full[len(base):], spans + [(a + shift, b + shift) for a, b in tail])


def _marked_spans(full: str, messages: list[dict], template: ChatTemplate, tokenizer, tools: list | None,
                  train_on: str) -> list[Span]:
    """The template's own `{% generation %}` spans (the last one alone for train_on=last)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        (text,), (spans,) = render_jinja_template([messages], tools=tools, chat_template=template.jinja,
                                                  return_assistant_tokens_mask=True,
                                                  **{**template.variables, **tokenizer.special_tokens_map})
    except Exception as e:
        raise RenderError(f"{template.label} rejected the conversation: {e}") from None
    if text != full:  # the markers only record positions; a template whose output depends on them is broken
        raise RenderError(f"{template.label} renders differently when its generation markers are active")
    spans = [(a, b) for a, b in spans if b > a]
    if not spans:
        raise RenderError(f"{template.label} has {{% generation %}} markers but marks no assistant text "
                          "in this conversation")
    return spans[-1:] if train_on == "last" else spans


def _probes(m: dict) -> list[dict]:
    """Stand-ins for message `m`, each saying nothing `m` says: first everything replaced by one probe string
    (its tool calls and reasoning gone); then, for templates that need the message's shape (e.g. tool calls to
    keep roles alternating), the same shape with probe names, arguments, content and reasoning."""
    said = "".join(str(v) for v in m.values())
    probe = next(p for p in _PROBES if p[0] not in said and p[1] not in said)
    keep = {k: m[k] for k in ("role", "name", "tool_call_id") if k in m}
    variants = [{**keep, "content": probe}]
    if m.get("tool_calls") or m.get("reasoning_content"):
        shaped = {**m, "content": probe}
        if m.get("tool_calls"):
            shaped["tool_calls"] = [{**c, "function": {"name": probe, "arguments": {probe: probe}}} for c in m["tool_calls"]]
        if m.get("reasoning_content"):
            shaped["reasoning_content"] = probe
        variants.append(shaped)
    return variants


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search over slice comparisons: each is a C memcmp
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _region(text: str, other: str) -> Span | None:
    """Where the template wrote a message in `text`, from `other`, the rendering with only that message replaced
    by a probe: the stretch that changes (None when nothing changes: the template leaves the message out)."""
    if other == text:
        return None
    a = _common_prefix(text, other)
    s = _common_suffix(text, other, min(len(text), len(other)) - a)
    return a, len(text) - s


@lru_cache(maxsize=64)
def _generation_prompt(jinja: str, specials: tuple) -> str:
    messages = [{"role": "user", "content": "loratune probe question"}]
    special = dict(specials)  # the template's variables and the tokenizer's special tokens
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        (with_gen,), _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=True, **special)
        (without,), _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=False, **special)
    except Exception:  # a template that cannot render a lone user turn: no generation prompt to reach back to
        return ""
    return with_gen[len(without):] if with_gen.startswith(without) else ""


def generation_prompt(tokenizer, template: ChatTemplate) -> str:
    """The text the template adds for `add_generation_prompt` (the header of an assistant turn), or ''."""
    variables = {**template.variables, **tokenizer.special_tokens_map}
    return _generation_prompt(template.jinja, tuple(sorted(variables.items(), key=lambda kv: kv[0])))


def _turn(full: str, messages: list[dict], regions: list[Span | None], i: int, stop: str, eos: str, gen: str,
          prompt: str | None, template: ChatTemplate) -> Span:
    """The supervised span of assistant message i: from where its generation starts (the end of `prompt`, the
    conversation before it with the generation prompt, when the rendering starts with it; else the end of the
    generation prompt `gen` found in the template text before the content) to the end of its end of turn."""
    region = regions[i]
    if region is None:
        raise RenderError(f"{template.label} leaves out assistant message {i}: it is not in the "
                          "rendering, so it cannot be trained on")
    a, b = region
    # Forward over template text only (up to the next message's text) to the end of turn: usually right after the
    # content; after it when the template closes a tool call first. eos is accepted where other turns use the
    # template's own end-of-turn text.
    after = min((r[0] for j, r in enumerate(regions) if j != i and r is not None and r[0] >= b), default=len(full))
    closes = [(at, len(t)) for t in dict.fromkeys((stop, eos)) if (at := full.find(t, b, after)) >= 0]
    if not closes:
        found = full[b:b + max(len(stop), 12)]
        raise RenderError(f"{template.label} does not close assistant message {i} with its end-of-turn "
                          f"text {stop!r} (it writes {found!r} after it), so the model could not learn to stop; "
                          "use a template that ends every assistant turn with an end-of-turn token")
    at, length = min(closes)
    end = at + length
    before = max((r[1] for j, r in enumerate(regions) if j != i and r is not None and r[1] <= a), default=0)
    start = a
    if prompt is not None and before <= len(prompt) <= a and full.startswith(prompt):
        start = len(prompt)  # exactly where generation would start
    elif gen:  # template text inside the turn, after its header (e.g. an empty think block), in template text only
        at = full.rfind(gen, before, a)
        if at >= 0:
            start = at + len(gen)
    for j, r in enumerate(regions):
        if j != i and r is not None and r[1] > r[0] and r[0] < end and start < r[1]:
            raise RenderError(
                f"{template.label} writes message {j} ({messages[j]['role']}) inside assistant "
                f"message {i}'s turn, so which tokens the assistant produces is ambiguous; use data.train_on=last, or a "
                "template that renders each message in its own turn (data.template)")
    return start, end


def _check_tools_kept(full: str, messages: list[dict], tools: list | None, template: ChatTemplate) -> None:
    """Tool schemas and tool calls must be in the text: a template that ignores them would train the model on
    a conversation it never sees."""
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] not in full:
                raise RenderError(f"{template.label} leaves out the tool calls of message {i}; use a "
                                  "template that renders tool_calls (every built-in one does)")
    for tool in tools or []:
        if tool["function"]["name"] not in full:
            raise RenderError(f"{template.label} leaves out the record's tools; use a template that "
                              "renders tools (every built-in one does)")


def plan_text(text: str, tokenizer) -> Plan:
    """Plain text for continued pretraining: loss on every token, eos appended to close the document."""
    full = text + tokenizer.eos_token
    return Plan(full, [(0, len(full))])


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Supervise each token whose characters overlap a span (tokens and spans are both in text order)."""
    labels = [IGNORE] * len(ids)
    j = 0
    for t, (a, b) in enumerate(offsets):
        b = max(b, a + 1)  # a zero-width token (trimmed whitespace) still sits at one position
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and spans[j][0] < b:
            labels[t] = ids[t]
    return labels


def _encode_pieces(tokenizer, plan: Plan) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: tokenize the text piece by piece, cut at the span boundaries."""
    cuts = sorted({0, len(plan.text), *(c for s in plan.spans for c in s)})
    ids: list[int] = []
    labels: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer.encode(plan.text[a:b], add_special_tokens=False)
        inside = any(s <= a and b <= e for s, e in plan.spans)
        ids += piece
        labels += piece if inside else [IGNORE] * len(piece)
    return ids, labels


def _finish(ids: list[int], labels: list[int], info: TokenizerInfo) -> tuple[list[int], list[int]]:
    """Exactly one BOS, and no label on the first token."""
    if info.adds_bos and info.bos_id is not None and (not ids or ids[0] != info.bos_id):
        ids, labels = [info.bos_id, *ids], [IGNORE, *labels]
    if info.bos_id is not None and info.bos_id not in (info.eos_id, info.pad_id) and ids.count(info.bos_id) > 1:
        raise RenderError(f"the sequence holds {ids.count(info.bos_id)} BOS tokens ({info.bos_token!r}); expected "
                          "exactly one: does a message contain the BOS text?")
    if labels:
        labels[0] = IGNORE
    return ids, labels


def encode(plans: list[Plan], tokenizer, info: TokenizerInfo) -> list[tuple[list[int], list[int]]]:
    """Tokenize rendered plans (in one batch call, which the Rust tokenizer runs in parallel)."""
    if not plans:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [_finish(*_encode_pieces(tokenizer, p), info) for p in plans]
    enc = tokenizer([p.text for p in plans], add_special_tokens=False, return_offsets_mapping=True)
    return [_finish(list(ids), _labels_from_offsets(ids, offs, p.spans), info)
            for ids, offs, p in zip(enc["input_ids"], enc["offset_mapping"], plans)]


def render_conversation(messages: list[dict], template: ChatTemplate, tokenizer, info: TokenizerInfo,
                        train_on: str = "assistant", tools: list | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 where no loss is taken (not shifted)."""
    return encode([plan_conversation(messages, template, tokenizer, train_on, tools)], tokenizer, info)[0]


def encode_prompt(messages: list[dict], template: ChatTemplate, tokenizer, info: TokenizerInfo,
                  tools: list | None = None) -> list[int]:
    """Token ids of a prompt for generation: the conversation plus the generation prompt, rendered and
    BOS-handled exactly as in training, so serving sees what training saw."""
    text = _render(tokenizer, template, messages, True, tools)
    return _finish(tokenizer(text, add_special_tokens=False)["input_ids"], [], info)[0]
