"""`/v1/adapters`: adapters loaded and unloaded while the server runs (infer/adapter_api.py), through the app.

Loading is confined to the directories given at startup; `/v1/models` follows; an adapter loaded at run time
answers as the same folder served from the start; errors are OpenAI's JSON with the field named.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_infer_server import KEY, LiveServer, raw

from loratune.infer.engine import Delta
from loratune.infer.load import load_engine
from loratune.infer.sampling import SamplingParams
from loratune.infer.server import create_app


@pytest.fixture(scope="module")
def runs(adapter_a: Path, adapter_b: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed directory holding copies of two run folders, one broken one and one of another base."""
    root = tmp_path_factory.mktemp("allowed")
    shutil.copytree(adapter_a, root / "alpha")
    shutil.copytree(adapter_b, root / "beta")
    shutil.copytree(adapter_b, root / "othershape")
    cfg = json.loads((root / "othershape" / "adapter_config.json").read_text())
    cfg["r"] = 4  # the tensors are rank 8: the config and the weights disagree
    (root / "othershape" / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copytree(adapter_b, root / "otherbase")
    yaml = (root / "otherbase" / "loratune.yaml").read_text()  # model.path is its first `path:`
    (root / "otherbase" / "loratune.yaml").write_text(yaml.replace("path: ", "path: /elsewhere", 1))
    shutil.copytree(adapter_b, root / "othershapes")  # A one column wider than the layer's input
    weights = load_file(str(root / "othershapes" / "adapter_model.safetensors"))
    name = next(k for k in sorted(weights) if k.endswith("q_proj.lora_A.weight"))
    weights[name] = torch.cat([weights[name], weights[name][:, :1]], dim=1)
    save_file(weights, str(root / "othershapes" / "adapter_model.safetensors"))
    shutil.copytree(adapter_b, root / "othermodules")  # weights for a layer this decoder does not have
    weights = load_file(str(root / "othermodules" / "adapter_model.safetensors"))
    weights = {k.replace("layers.0.", "layers.99.", 1): v for k, v in weights.items()}
    save_file(weights, str(root / "othermodules" / "adapter_model.safetensors"))
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def served(adapter_a: Path, runs: Path, tmp_path_factory: pytest.TempPathFactory):
    """A batching server starting with alpha only, loading allowed from `runs`, at most 2 adapters resident."""
    engine = load_engine([str(adapter_a)], implementation=None, max_adapters=2)
    app = create_app(engine, api_key=KEY, batch_slots=4, adapter_dirs=[str(runs)])
    with LiveServer(app) as live:
        yield live, engine


def _err(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_load_answer_and_unload(served, runs: Path, adapter_b: Path) -> None:
    live, engine = served
    client = openai.OpenAI(api_key=KEY, base_url=live.url + "/v1", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["base", "alpha"]
    r = raw(live, "POST", "/v1/adapters", {"name": "b2", "path": str(runs / "beta")})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "b2" and r.json()["resident"] is True
    assert [m.id for m in client.models.list()] == ["base", "alpha", "b2"]
    # it answers as beta served from the start would (same folder): compare with an engine that has it
    ref = load_engine([str(adapter_b)], implementation=None)
    fmt = ref.format("beta")
    want = "".join(e.text for e in ref.generate([fmt.encode("Hello there")], SamplingParams(max_new_tokens=12),
                                                  "beta", ignore_eos=True) if isinstance(e, Delta))
    got = client.completions.create(model="b2", prompt="Hello there", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want
    listed = raw(live, "GET", "/v1/adapters").json()
    assert [a["id"] for a in listed["data"]] == ["alpha", "b2"] and listed["max_adapters"] == 2
    assert listed["data"][1]["path"] == str((runs / "beta").resolve())
    # unloaded: gone from /v1/models, requests for it are 404
    r = raw(live, "DELETE", "/v1/adapters/b2")
    assert r.status_code == 200 and r.json() == {"id": "b2", "object": "adapter", "deleted": True}
    assert [m.id for m in client.models.list()] == ["base", "alpha"]
    err = _err(raw(live, "POST", "/v1/completions", {"model": "b2", "prompt": "Hi", "max_tokens": 2}), 404)
    assert err["code"] == "model_not_found"
    assert _err(raw(live, "DELETE", "/v1/adapters/b2"), 404)["code"] == "model_not_found"
    assert "base model" in _err(raw(live, "DELETE", "/v1/adapters/base"), 400)["message"]


def test_the_lru_drops_and_reloads_adapters_behind_the_api(served, runs: Path) -> None:
    live, engine = served
    for name, folder in (("x1", "alpha"), ("x2", "beta")):
        assert raw(live, "POST", "/v1/adapters", {"name": name, "path": str(runs / folder)}).status_code == 200
    try:
        assert len(engine.bank.resident) == 2  # alpha (served from the start) dropped for x2
        resident = {a["id"]: a["resident"] for a in raw(live, "GET", "/v1/adapters").json()["data"]}
        assert resident == {"alpha": False, "x1": True, "x2": True}
        body = {"prompt": "Hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        a = raw(live, "POST", "/v1/completions", {"model": "alpha", **body}).json()["choices"][0]["text"]
        x1 = raw(live, "POST", "/v1/completions", {"model": "x1", **body}).json()["choices"][0]["text"]
        assert a == x1  # the same folder: alpha was read again from disk and answers as before
        assert len(engine.bank.resident) == 2
    finally:
        for name in ("x1", "x2"):
            raw(live, "DELETE", f"/v1/adapters/{name}")


@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"name": "z", "path": "/etc"}, 403, "path", "outside the directories"),
    ({"name": "z", "path": "RUNS/../../"}, 403, "path", "outside the directories"),
    ({"name": "z", "path": "RUNS/missing"}, 400, "path", "no such folder"),
    ({"name": "z", "path": "RUNS/empty"}, 400, "path", "not an adapter folder"),
    ({"name": "z", "path": "RUNS/othershape"}, 400, "path", "the config says r=4"),
    ({"name": "z", "path": "RUNS/otherbase"}, 400, "path", "this server's base is"),
    ({"name": "z", "path": "RUNS/othershapes"}, 400, "path", "an adapter of another base model?"),
    ({"name": "z", "path": "RUNS/othermodules"}, 400, "path", "which is not a projection of this llama decoder"),
    ({"name": "alpha", "path": "RUNS/beta"}, 409, "name", "already served"),
    ({"name": "base", "path": "RUNS/beta"}, 409, "name", "already served"),
    ({"name": "a/b", "path": "RUNS/beta"}, 400, "name", "expected letters"),
    ({"name": "z"}, 400, "path", "Field required"),
])
def test_bad_loads_are_clear_json_errors(served, runs: Path, body: dict, status: int, param: str,
                                         words: str) -> None:
    live, engine = served
    body = {k: v.replace("RUNS", str(runs)) for k, v in body.items()}
    err = _err(raw(live, "POST", "/v1/adapters", body), status)
    assert err["param"] == param and words in err["message"], err
    assert "z" not in engine.names


def test_loading_is_off_without_adapter_dirs(engine, adapter_b: Path) -> None:
    with LiveServer(create_app(engine, api_key=KEY)) as live:
        err = _err(raw(live, "POST", "/v1/adapters", {"name": "z", "path": str(adapter_b)}), 403)
        assert "--adapter-dir" in err["message"] and err["code"] == "adapter_loading_off"


def test_more_adapters_asked_at_once_than_fit_on_the_device_wait_their_turn(adapter_a: Path, adapter_b: Path,
                                                                             runs: Path) -> None:
    """--max-adapters 1 and requests for three adapters and the base at once: each waits until its adapter has
    room (no request is refused or answered with another adapter), and each answers as alone."""
    engine = load_engine([str(adapter_a), str(adapter_b), f"gamma={runs / 'alpha'}"], implementation=None,
                         max_adapters=1)
    jobs = [(name, prompt) for name in ("alpha", "beta", "base", "gamma") for prompt in ("Hi", "Tell me a story")]
    want = {}
    for name, prompt in jobs:
        events = engine.generate([engine.format(name).encode(prompt)], SamplingParams(max_new_tokens=10), name,
                                 ignore_eos=True)
        want[name, prompt] = "".join(e.text for e in events if isinstance(e, Delta))
    with LiveServer(create_app(engine, api_key=KEY, batch_slots=4, max_pending=16)) as live:
        client = openai.OpenAI(api_key=KEY, base_url=live.url + "/v1", max_retries=0, timeout=120)
        got: dict = {}

        def ask(name: str, prompt: str) -> None:
            r = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
            got[name, prompt] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want
        assert len(engine.bank.resident) == 1 and not engine.bank.pins
        h = raw(live, "GET", "/health").json()
        assert h["completed"] == len(jobs) and h["running"] == 0
