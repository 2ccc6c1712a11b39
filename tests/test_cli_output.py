"""What a person reads on stderr: library noise hidden by default, everything back with `-v`.

The commands run in fresh processes (bitsandbytes warns when it is first imported, and the demo model is
built into an empty cache so that transformers' "Writing model shards" bar would appear).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from loratune.cli import quiet_libraries

ROOT = Path(__file__).parents[1]
QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")


def loratune(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORATUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-m", "loratune.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def building_line(tmp_path: Path) -> str:
    return f"building the demo model demo://llama-test in {tmp_path / 'cache' / 'demo' / 'llama-test-seed0'} (once)"


def test_chat_prints_only_its_own_lines_on_stderr(tmp_path: Path) -> None:
    done = loratune(tmp_path, "chat", "demo://llama-test", "--prompt", "hi", "--max-tokens", "2")
    assert done.returncode == 0, done.stderr
    # no bitsandbytes kernel notice, no bars; which model code answers, in one line as training says it
    assert done.stderr.splitlines() == [building_line(tmp_path), "model: loratune's decoder (llama)"]
    assert done.stdout.strip()


def test_data_preview_hides_transformers_bars_unless_verbose(tmp_path: Path) -> None:
    args = ("data", "preview", QUICKSTART, "model.path=demo://llama-test", "-n", "1")
    quiet = loratune(tmp_path / "quiet", *args)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.splitlines() == [building_line(tmp_path / "quiet")]
    assert "data:" in quiet.stdout or "samples" in quiet.stdout

    verbose = loratune(tmp_path / "verbose", "-v", *args)
    assert verbose.returncode == 0, verbose.stderr
    assert "Writing model shards: 100%" in verbose.stderr
    assert f"INFO loratune.model.load: {building_line(tmp_path / 'verbose')}" in verbose.stderr


def _warn_from(module: str, category: type[Warning]) -> None:
    warnings.warn_explicit("notice", category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)


def test_future_warnings_are_hidden_only_from_transformers_and_peft() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # the interpreter's defaults: FutureWarning and UserWarning shown
        with quiet_libraries(verbose=False):
            _warn_from("transformers.modeling_utils", FutureWarning)
            _warn_from("peft.tuners.lora.model", FutureWarning)
            _warn_from("transformers.modeling_utils", UserWarning)  # not a deprecation: shown
            _warn_from("loratune.train.run", FutureWarning)  # ours: shown
            _warn_from("transformersx", FutureWarning)  # another package whose name only starts alike
        with quiet_libraries(verbose=True):
            _warn_from("transformers.modeling_utils", FutureWarning)
        _warn_from("peft.tuners.lora.model", FutureWarning)  # the filter ends with the command
    assert [(w.category, w.filename) for w in caught] == [
        (UserWarning, "transformers/modeling_utils.py"), (FutureWarning, "loratune/train/run.py"),
        (FutureWarning, "transformersx.py"), (FutureWarning, "transformers/modeling_utils.py"),
        (FutureWarning, "peft/tuners/lora/model.py")]


def test_filters_set_by_the_user_decide_first() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as `python -W always` or PYTHONWARNINGS=always would
        with quiet_libraries(verbose=False):
            _warn_from("transformers.modeling_utils", FutureWarning)
    assert len(caught) == 1


@pytest.mark.parametrize("verbose, shown", [(False, ["bitsandbytes.nn.modules"]),
                                            (True, ["bitsandbytes.backends.cpu.ops", "bitsandbytes.nn.modules"])])
def test_only_the_named_library_logger_is_quieted(caplog: pytest.LogCaptureFixture, verbose: bool,
                                                   shown: list[str]) -> None:
    caplog.set_level(logging.WARNING)
    with quiet_libraries(verbose):
        for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.nn.modules"):
            logging.getLogger(name).warning("notice")
    assert [r.name for r in caplog.records] == shown
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.NOTSET  # put back


def test_transformers_bars_are_silent_inside_and_back_after() -> None:
    from transformers.utils import logging as hf_logging

    with quiet_libraries(verbose=False):
        assert hf_logging.tqdm(range(3), desc="Loading weights").disable is True
    previous = hf_logging.set_tqdm_hook(None)  # the hook the command set is gone again
    assert previous is None
