"""`loratune chat` driven as a person would: through a pseudo-terminal, and as a script through pipes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pexpect

from loratune.infer.engine import Delta, Finish
from loratune.infer.sampling import SamplingParams

PROMPT = ">>> "


def engine_answer(engine, name: str, messages: list[dict], max_tokens: int) -> tuple[str, Finish]:
    events = list(engine.chat(messages, SamplingParams(max_new_tokens=max_tokens), name))
    return "".join(e.text for e in events if isinstance(e, Delta)), events[-1]


def spawn(adapter, *args: str) -> pexpect.spawn:
    cmd = [sys.executable, "-m", "loratune.cli", "chat", str(adapter), "--temperature", "0", *args]
    child = pexpect.spawn(cmd[0], cmd[1:], env={**os.environ, "TERM": "dumb"}, encoding="utf-8",
                          codec_errors="replace", timeout=60, dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def read_answer(child: pexpect.spawn) -> str:
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n")


def _long_prompt(engine) -> str:
    """A prompt whose greedy answer does not end early, so Ctrl-C arrives mid-answer."""
    for prompt in ("Tell me a long story", "Count", "Go on", "Write", "List things"):
        _, finish = engine_answer(engine, "alpha", [{"role": "user", "content": prompt}], 100)
        if finish.reason == "length":
            return prompt
    raise AssertionError("no prompt gives a long greedy answer on this tiny model: Ctrl-C would not be tested")


def test_interactive_session(engine, adapter_a) -> None:
    """One terminal session: two turns that match the engine, Ctrl-C mid-answer, every command, /exit."""
    child = spawn(adapter_a, "--max-tokens", "12")
    child.sendline("Hello there")
    first = read_answer(child)
    messages = [{"role": "user", "content": "Hello there"}]
    expected1, _ = engine_answer(engine, "alpha", messages, 12)
    assert first.startswith("Hello there\n")  # the terminal echoes the line typed
    assert expected1 in first
    child.sendline("And then?")
    second = read_answer(child)
    messages += [{"role": "assistant", "content": expected1}, {"role": "user", "content": "And then?"}]
    expected2, _ = engine_answer(engine, "alpha", messages, 12)
    assert expected2 in second  # the second turn saw the first

    child.sendline("/reset")
    child.expect_exact("conversation reset")
    child.expect_exact(PROMPT)
    child.sendline("/set max_tokens=1000")
    child.expect_exact(PROMPT)
    long_prompt = _long_prompt(engine)
    child.sendline(long_prompt)
    child.expect_exact(long_prompt + "\r\n")  # the terminal's echo of the line
    child.expect(r"\S\S\S", timeout=30)  # the answer has started streaming
    started = time.time()
    child.sendintr()
    child.expect_exact("[stopped]", timeout=10)
    child.expect_exact(PROMPT)
    assert time.time() - started < 5
    child.sendline("/show")
    child.expect(r"turns: 2")  # the partial answer is kept
    child.expect_exact(PROMPT)

    child.sendline("/set temperature=0.3 top_k=5 max_tokens=7")
    child.expect(r"max_new_tokens=7 .*temperature=0.3 top_k=5")
    child.expect_exact(PROMPT)
    child.sendline("/set colour=blue")
    child.expect_exact("error: /set takes KEY=VALUE")
    child.expect_exact(PROMPT)
    child.sendline("/system You are terse.")
    child.expect_exact("system prompt set")
    child.expect_exact(PROMPT)
    child.sendline("/show")
    child.expect_exact("system: You are terse.")
    child.expect_exact("turns: 0")
    child.expect_exact(PROMPT)
    child.sendline("/help")
    child.expect_exact("/system TEXT")
    child.expect_exact(PROMPT)
    child.sendline("/frobnicate")
    child.expect_exact("unknown command /frobnicate")
    child.expect_exact(PROMPT)
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("/exit or Ctrl-D leaves")
    child.expect_exact(PROMPT)
    child.sendline("short one")
    child.expect_exact(PROMPT)  # still answering after all that
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_end_of_input_leaves(engine, monkeypatch) -> None:
    """Ctrl-D (end of input) after a turn leaves with status 0."""
    import io

    from loratune.infer.chat import interactive

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    out = io.StringIO()
    assert interactive(engine, "alpha", SamplingParams(max_new_tokens=4), None, out=out) == 0
    expected, _ = engine_answer(engine, "alpha", [{"role": "user", "content": "Hi"}], 4)
    assert expected in out.getvalue()


def test_non_interactive_prompt_and_stdin(engine, adapter_a, capsys, monkeypatch) -> None:
    from loratune.cli import main

    expected, _ = engine_answer(engine, "alpha", [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}], 10)
    args = ["chat", str(adapter_a), "--temperature", "0", "--max-tokens", "10", "--system", "Be brief."]
    assert main(args + ["--prompt", "Hi"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    piped = subprocess.run([sys.executable, "-m", "loratune.cli", *args], input="Hi\n", capture_output=True,
                           text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == expected + "\n"
    assert "FutureWarning" not in piped.stderr and "Traceback" not in piped.stderr
    stop = expected[2:4]
    assert stop.strip() and main(args + ["--prompt", "Hi", "--stop", stop, "--stop", "@@"]) == 0
    assert capsys.readouterr().out == expected[:expected.index(stop)] + "\n"


def test_user_errors_are_one_line(tmp_path, capsys) -> None:
    from loratune.cli import main

    assert main(["chat", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no such folder: {tmp_path / 'missing'}"
    assert main(["chat", str(tmp_path), "--prompt", "x", "--temperature", "5"]) == 2
    assert capsys.readouterr().err.strip() == "error: temperature must be in [0, 2], got 5.0"
