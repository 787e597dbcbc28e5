"""How the inference worker is configured: the serve flags, and its share of the host's memory."""

from __future__ import annotations

import pytest

from naive_model.config import RUNTIME_FALLBACK_BYTES
from service.cli.app import main as cli_main
from service.jobs.model_tasks import model_cache_bytes
from service.jobs.validation import HOST_MEMORY_SHARE
from service.processes.inference_process import InferenceWorker


def test_serve_hands_model_cache_and_the_task_bound_to_the_server(monkeypatch, tmp_path):
    import service.api.server as server_module

    configs = []
    monkeypatch.setattr(server_module, "serve", lambda config, **_: configs.append(config))
    status = cli_main(
        ["serve", "--model-cache", "3", "--max-model-tasks", "5", "--no-metrics"]
        + ["--port", "0", "--state-dir", str(tmp_path)]
    )
    assert status == 0
    assert configs[0].model_cache == 3 and configs[0].max_model_tasks == 5

    configs.clear()
    assert cli_main(["serve", "--port", "0", "--no-metrics", "--state-dir", str(tmp_path)]) == 0
    assert configs[0].model_cache == 4 and configs[0].max_model_tasks == 8  # the defaults


def test_serve_refuses_a_model_cache_below_one(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--model-cache", "0"])
    assert "--model-cache" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model_cache must be at least 1, got 0"):
        InferenceWorker(model_cache=0)


def test_kept_models_take_a_jobs_share_of_the_host_less_tensorflow():
    host = 16 * 1024**3
    assert model_cache_bytes(host) == int(HOST_MEMORY_SHARE * host) - RUNTIME_FALLBACK_BYTES
    # A tiny host: no model fits, each is loaded.
    assert model_cache_bytes(RUNTIME_FALLBACK_BYTES) == 1
    assert model_cache_bytes(0) == 0  # unknown: bounded by the model count alone
