"""The Ray Serve entry points that need no cluster: the shipped Serve config file is a valid Serve
config naming our deployments, ``build`` makes the application from its ``args``, and
``rxrt serve --ray`` refuses what it cannot serve before starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

import rxruntime.serving.ray
from rxruntime.cli import main
from rxruntime.serving.ray.app import APP_NAME, ENGINE, INGRESS, build

CONFIG = Path(rxruntime.serving.ray.__file__).parent / "config.yaml"


def test_the_shipped_serve_config_is_valid_and_names_our_deployments() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    assert app.name == APP_NAME and app.import_path == "rxruntime.serving.ray.app:build"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {ENGINE, INGRESS}
    scaling = deployments[ENGINE].autoscaling_config
    assert isinstance(scaling, dict) and scaling["target_ongoing_requests"] > 0
    assert isinstance(build(app.args), Application)


def test_build_needs_the_redis_store() -> None:
    with pytest.raises(ValueError, match="args.store is required"):
        build({"model": "small"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--store", "sqlite:///x.db"], "--store redis://"),
        (["--store", "redis://127.0.0.1:1/0", "--bind", "tcp://127.0.0.1:5555"], "zmq front"),
        (["--store", "redis://127.0.0.1:1/0", "--replicas", "0"], "at least 1"),
    ],
)
def test_serve_ray_refuses_what_it_cannot_serve_before_starting_ray(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--ray", "--http", "127.0.0.1:0", *extra]) == 2
    assert message in capsys.readouterr().err
