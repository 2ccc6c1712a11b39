"""Config loading: YAML + overrides, strict validation with messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratune.cli import main
from loratune.config import Config, load_config, reference_markdown
from loratune.errors import ConfigError

BASE = "model:\n  path: demo://llama-test\ndata:\n  datasets:\n    - path: data.jsonl\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_the_qlora_paper(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert (cfg.quantization.bits, cfg.quantization.quant_type, cfg.quantization.double_quant) == (4, "nf4", True)
    assert cfg.adapter.target_modules == "all-linear"
    assert (cfg.adapter.rank, cfg.adapter.alpha) == (64, 16.0)
    assert cfg.train.optimizer == "paged_adamw_32bit"
    assert (cfg.train.max_grad_norm, cfg.train.lr, cfg.train.scheduler) == (0.3, 2e-4, "constant")
    assert cfg.model.trust_remote_code is False


def test_overrides_typed_and_nested(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), ["train.lr=1e-4", "adapter.rank=8", "quantization.double_quant=false",
                                              "adapter.target_modules=[q_proj, v_proj]", "data.datasets.0.format=alpaca"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.adapter.rank == 8 and cfg.quantization.double_quant is False
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.datasets[0].format == "alpaca"


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE + "train:\n  lr: 2e-5\n"))
    assert cfg.train.lr == pytest.approx(2e-5)


@pytest.mark.parametrize("override, message", [
    ("adapter.rnak=8", "unknown config key 'adapter.rnak': did you mean 'adapter.rank'?"),
    ("trian.lr=1e-4", "unknown config key 'trian': did you mean 'train'?"),
    ("adapter.rank=eight", "config key 'adapter.rank': got 'eight', expected an integer"),
    ("adapter.rank=2.5", "config key 'adapter.rank': got 2.5, expected an integer"),
    ("quantization.bits=5", "config key 'quantization.bits': got 5, expected one of 2, 3, 4, 8, 16, 32"),
    ("quantization.bits=3", "quantization.bits 3 needs quantization.method hqq"),
    ("quantization.quant_type=nf5", "expected one of 'nf4', 'fp4' (did you mean 'nf4'?)"),
    ("model.trust_remote_code=maybe", "config key 'model.trust_remote_code': got 'maybe', expected true or false"),
    ("train.lr=fast", "config key 'train.lr': got 'fast', expected a number"),
    ("adapter.type=none", "adapter.type 'none' (full fine-tuning) needs quantization.bits 16 or 32, got 4"),
    ("adapter.dropout=1.5", "adapter.dropout must be in [0, 1), got 1.5"),
    ("train.max_steps=0", "set train.max_steps > 0 or train.epochs > 0"),
    ("notakey", "override 'notakey' is not of the form dotted.key=value"),
])
def test_errors_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), [override])
    assert message in str(e.value)


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"allowed here: type, rank, alpha, dropout"):
        load_config(write(tmp_path, BASE + "adapter:\n  lora_rank: 8\n"))


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config key 'model.path' is required"):
        load_config(write(tmp_path, "train:\n  lr: 1e-4\n"))


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_misspelled_key_exits_nonzero_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(write(tmp_path, BASE + "train:\n  learning_rate: 1e-4\n"))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == ("error: unknown config key 'train.learning_rate': allowed here: "
                           + err.split("allowed here: ")[1].strip())
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_reference_doc_is_generated_and_current() -> None:
    """docs/config.md must be exactly what the schema generates (regenerate: loratune config-docs --out docs/config.md)."""
    doc = Path(__file__).parents[1] / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == reference_markdown() + "\n"
    for section in Config.__dataclass_fields__:
        assert f"## `{section}`" in doc.read_text()


def test_every_example_config_is_valid() -> None:
    """The bundled configs load through the same validation as a user's (the quickstart also trains in CI)."""
    from pathlib import Path

    from loratune.eval.config import load_eval_config

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert len(examples) >= 3
    for path in examples:
        if path.name == "eval.yaml":  # `loratune eval`'s config, its own schema
            ecfg = load_eval_config(path)
            assert ecfg.models and ecfg.generate, path
            continue
        cfg = load_config(path)
        assert cfg.model.path and cfg.data.datasets, path
