"""Property tests over random conversations and samples (hypothesis).

- labels are a subset of the ids, and exactly the assistant turns (content + end-of-turn) carry loss;
- one BOS, never a label on the first token;
- padding is never supervised, by position, even when pad == eos (the tiny Llama has pad == eos);
- packing keeps every token of every sample exactly once, in rows no longer than max_length;
- batch order covers each sample exactly once and depends only on (seed, epoch).
"""

from __future__ import annotations

import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratune.data.collate import batch_order, collate
from loratune.data.packing import pack
from loratune.data.render import IGNORE, render_conversation
from loratune.data.sample import Sample
from loratune.data.templates import TEMPLATES, resolve_template

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text without the special-token markup of any template (a message quoting "<|im_end|>" is another test).
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>|[]#"), min_size=1, max_size=40) \
    .filter(lambda s: s.strip())


@st.composite
def conversations(draw) -> list[dict]:
    msgs = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [{"role": "user", "content": draw(text)}, {"role": "assistant", "content": draw(text)}]
    return msgs


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    out, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


@SETTINGS
@given(conv=conversations(), family=st.sampled_from(FAMILIES), other=st.sampled_from([None, *TEMPLATES]))
def test_labels_are_exactly_the_assistant_turns(toks: dict, conv: list[dict], family: str, other: str | None) -> None:
    tok, info = toks[family]
    template = TEMPLATES[other] if other else resolve_template("auto", tok)
    ids, labels = render_conversation(conv, template, tok, info)
    assert len(ids) == len(labels)
    assert all(label in (i, IGNORE) for i, label in zip(ids, labels))  # labels are a subset of the ids
    assert labels[0] == IGNORE
    if info.bos_id is not None and info.adds_bos:
        assert ids[0] == info.bos_id and ids.count(info.bos_id) == 1
    assistant = [m["content"] for m in conv if m["role"] == "assistant"]
    stop = template.stop_text(tok.eos_token)
    # compared in NFC: the Qwen2 tokenizer normalises text (a CJK compatibility ideograph comes back unified)
    supervised = [unicodedata.normalize("NFC", tok.decode(r)) for r in runs(ids, labels)]
    assistant = [unicodedata.normalize("NFC", c) for c in assistant]
    assert len(supervised) == len(assistant)  # one run per assistant turn, nothing else
    for got, content in zip(supervised, assistant):
        assert content + stop in got  # the whole reply and its end-of-turn text
        assert got.endswith(stop)  # and nothing after it
        assert len(got) - len(content + stop) <= 2  # at most a shared boundary token of the prompt


lengths = st.lists(st.integers(1, 64), min_size=1, max_size=40)


def samples_of(lens: list[int], vocab: int = 500) -> list[tuple[list[int], list[int]]]:
    """Distinct recognisable samples: sample k has ids k*1000 + position, labels alternating."""
    out = []
    for k, n in enumerate(lens):
        ids = [k * 1000 + t for t in range(n)]
        out.append((ids, [IGNORE] + [x if x % 2 else IGNORE for x in ids[1:]]))
    return out


@SETTINGS
@given(lens=lengths, max_length=st.integers(64, 200))
def test_packing_keeps_every_token_once(lens: list[int], max_length: int) -> None:
    samples = samples_of(lens)
    rows = pack(samples, max_length)
    assert all(len(r) <= max_length for r in rows)
    recovered = []
    for r in rows:
        starts = [t for t, p in enumerate(r.position_ids) if p == 0] + [len(r)]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):
            assert r.position_ids[a:b] == list(range(b - a))
            recovered.append((r.input_ids[a:b], r.labels[a:b]))
    assert sorted(recovered) == sorted(samples)
    # no sample's first token is a target, so no sample predicts the next one's start
    assert all(r.labels[a] == IGNORE for r in rows for a, p in enumerate(r.position_ids) if p == 0)


@SETTINGS
@given(lens=lengths, packed=st.booleans(), family=st.sampled_from(FAMILIES))
def test_padding_is_never_supervised(toks: dict, lens: list[int], packed: bool, family: str) -> None:
    tok, info = toks[family]
    eos = info.eos_id
    # every sample ends with a supervised eos, the token padding may share
    samples = [Sample([5] * (n - 1) + [eos], [IGNORE] * (n - 1) + [eos]) for n in lens]
    if packed:
        samples = pack([(s.input_ids, s.labels) for s in samples], 64)
    batch = collate(samples, info.pad_id)
    assert ("attention_mask" in batch) != packed and ("position_ids" in batch) == packed
    for i, s in enumerate(samples):
        n = len(s)
        assert batch["labels"][i, :n].tolist() == s.labels
        assert (batch["labels"][i, n:] == IGNORE).all()
        assert (batch["input_ids"][i, n:] == info.pad_id).all()
        if not packed:
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert int((batch["labels"] == eos).sum()) == sum(s.labels.count(eos) for s in samples)  # eos still learned


@SETTINGS
@given(lens=lengths, batch_size=st.integers(1, 8), seed=st.integers(0, 5), epoch=st.integers(0, 3), grouped=st.booleans())
def test_batch_order(lens: list[int], batch_size: int, seed: int, epoch: int, grouped: bool) -> None:
    samples = [Sample(list(range(n)), list(range(n))) for n in lens]
    order = batch_order(samples, batch_size, seed, epoch, grouped)
    assert order == batch_order(samples, batch_size, seed, epoch, grouped)  # a pure function: resumable
    assert sorted(i for b in order for i in b) == list(range(len(samples)))
    assert all(1 <= len(b) <= batch_size for b in order)
    if grouped:
        assert max(len(samples[i]) for i in order[0]) == max(lens)  # the longest batch first: OOM shows at once


@st.composite
def tool_conversations(draw) -> tuple[list[dict], list[dict] | None]:
    """Conversations with tool calls, tool results and system messages anywhere, ending with an answer."""
    names = ["lookup", "get_time", "add"]
    msgs = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": draw(st.sampled_from(["user", "user", "system", "tool"])), "content": draw(text)})
        if draw(st.booleans()):
            calls = [{"type": "function", "function": {"name": draw(st.sampled_from(names)), "arguments": {"q": draw(text)}}}
                     for _ in range(draw(st.integers(1, 2)))]
            msgs += [{"role": "assistant", "content": draw(st.sampled_from(["", "Let me check."])), "tool_calls": calls},
                     {"role": "tool", "content": draw(text)}]
        msgs.append({"role": "assistant", "content": draw(text)})
    tools = [{"type": "function", "function": {"name": n}} for n in names] if draw(st.booleans()) else None
    return msgs, tools


@SETTINGS
# "plain" writes the messages' texts side by side with nothing between them, so a BPE token may join the end of a
# user's text and the start of the answer (one run for two turns); its own golden tests pin what it supervises.
@given(conv=tool_conversations(), name=st.sampled_from([n for n in TEMPLATES if n != "plain"]),
       family=st.sampled_from(FAMILIES))
def test_builtin_templates_drop_nothing(toks: dict, conv, name: str, family: str) -> None:
    """Every built-in template renders every message, call and tool (the renderer checks it and would raise),
    and supervises exactly one run per assistant message: its text, its calls and its end-of-turn text."""
    messages, tools = conv
    tok, info = toks[family]
    template = TEMPLATES[name]
    ids, labels = render_conversation(messages, template, tok, info, tools=tools)
    stop = template.stop_text(tok.eos_token)
    supervised = [tok.decode(r) for r in runs(ids, labels)]
    replies = [m for m in messages if m["role"] == "assistant"]
    assert len(supervised) == len(replies)
    for got, m in zip(supervised, replies):
        assert got.endswith(stop) and m["content"] in got
        assert all(f'"name": "{c["function"]["name"]}"' in got for c in m.get("tool_calls", []))


@st.composite
def rendered(draw) -> tuple[list[int], list[int]]:
    """A rendered conversation's shape: BOS, prompt tokens, then target runs and masked runs."""
    ids, labels, k = [0], [IGNORE], 100
    for turn in range(draw(st.integers(1, 4))):
        for _ in range(draw(st.integers(0 if turn else 1, 30))):
            ids.append(k), labels.append(IGNORE)
            k += 1
        for _ in range(draw(st.integers(1, 20))):
            ids.append(k), labels.append(k)
            k += 1
    return ids, labels


@SETTINGS
@given(pair=rendered(), max_length=st.integers(4, 80), source=st.integers(0, 40), target=st.integers(0, 40),
       policy=st.sampled_from(["prompt_first", "end", "drop"]))
def test_length_limits(pair, max_length: int, source: int, target: int, policy: str) -> None:
    """Whatever the limits: rows fit, BOS stays first, tokens keep their order and labels, and the outcome
    names what happened (ok: untouched; a drop: nothing returned)."""
    from loratune.config import DataConfig
    from loratune.data.lengths import fit

    ids, labels = pair
    cfg = DataConfig(max_length=max_length, source_max_length=source, target_max_length=target, truncation=policy)
    pieces, outcome = fit(ids, labels, False, cfg, bos_id=0)
    if outcome in ("too_long", "no_supervised"):
        assert pieces == []
        assert outcome == "no_supervised" or (policy == "drop" and len(ids) > max_length)
        return
    [(got_ids, got_labels)] = pieces
    assert len(got_ids) == len(got_labels) <= max_length
    assert got_ids[0] == 0 and got_labels[0] == IGNORE
    assert any(x != IGNORE for x in got_labels)
    pos = {t: i for i, t in enumerate(ids)}
    assert [pos[t] for t in got_ids] == sorted(pos[t] for t in got_ids)  # a subsequence, in order
    assert all(got_labels[i] == labels[pos[t]] for i, t in enumerate(got_ids) if i)  # labels travel with tokens
    assert (outcome == "ok") == (got_ids == ids)
    if source:
        first = next(i for i, x in enumerate(got_labels) if x != IGNORE)
        assert first <= max(source, 1)
