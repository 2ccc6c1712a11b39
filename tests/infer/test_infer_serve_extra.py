"""`loratune serve` without the `[serve]` extra: one line naming the missing module and the extra to install.

A missing package is simulated with `sys.modules[NAME] = None` (what `import NAME` then does is exactly what
it does when NAME is not installed: `ModuleNotFoundError` with `.name == NAME`), so nothing is uninstalled.
"""

from __future__ import annotations

import sys

import pytest

from loratune.cli import main


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_serve_without_the_serve_extra_names_the_module_and_the_extra(module: str, monkeypatch, capsys) -> None:
    import loratune.infer
    import loratune.infer.server

    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, "loratune.infer.server")  # imported afresh, as in a new process
    monkeypatch.setattr(loratune.infer, "server", loratune.infer.server)  # put back after the test
    assert main(["serve", "demo://llama-test", "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: `loratune serve` needs the Python package '{module}', which is not installed: "
                            "pip install 'loratune[serve]'\n")
    assert "Traceback" not in captured.out + captured.err


def test_server_module_imports_when_the_extra_is_there() -> None:
    from loratune.infer import server

    assert callable(server.create_app) and callable(server.serve)
