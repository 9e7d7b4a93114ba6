"""How `ikctl [--hosts FILE | --cluster FILE] [-m MODEL] [placement flags]` sets up the app: the embedded default's
two local workers (stopped when the app exits), a cluster file's workers with their tokens, a hosts file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cluster import Cluster, ClusterWorker, write_cluster
from engine.synth import SynthSpec, write_model
from tests.tui.test_app import run_async, settle
from tests.tui.test_live_app import until
from tui.app import _parser, app_from_args, main
from tui.host_board import LOCAL_NAME
from tui.local_workers import LocalWorkers
from tui.screens.live import LiveScreen

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[LocalWorkers, str]]:
    """One worker that requires a token, as `ikctl launch` starts them."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-some-length")
    token_file.chmod(0o600)
    workers = LocalWorkers(threads=1, extra=["--token-file", str(token_file)])
    workers.start(1)
    yield workers, "s3cret-token-of-some-length"
    workers.close()


@run_async
async def test_nothing_given_starts_two_local_workers_and_splits_the_layers_across_them() -> None:
    app = app_from_args(_parser().parse_args([]))
    local = app.local
    assert local is not None and len(local.endpoints) == 2
    try:
        flags = app.placement.flags
        assert flags.rpc.split(",") == local.endpoints and flags.n_gpu_layers == "99" and flags.tensor_split == "1,1"
        assert [h.name for h in app.board.hosts] == [LOCAL_NAME]
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(app, pilot)
            assert app.monitor.endpoints == local.endpoints
        # the app owns them: gone when it exits
        assert all(not w.running for w in local.workers) and not local.directory.exists()
    finally:
        local.close()


@run_async
async def test_a_cluster_file_gives_endpoints_tokens_and_capacities(secured: tuple[LocalWorkers, str],
                                                                  tmp_path: Path) -> None:
    workers, token = secured
    (w,) = workers.workers
    path = tmp_path / "cluster.json"
    write_cluster(path, Cluster((ClusterWorker(host="here", device="cpu", endpoint=w.endpoint, token=token,
                                               mem_bytes=1 << 30, threads=1, pid=w.pid, log=str(w.log),
                                               token_file="-", ssh=None),)))
    app = app_from_args(_parser().parse_args(["--cluster", str(path), "-ngl", "99"]))
    assert app.local is None and app.tokens == {w.endpoint: token}
    assert app.placement.flags.rpc == w.endpoint and app.placement.flags.device_mem == f"RPC[{w.endpoint}]=1GiB"
    assert [h.name for h in app.board.hosts] == ["here"] and app.board.launched["here"][0].endpoint == w.endpoint
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f4")
        live = app.screen
        assert isinstance(live, LiveScreen)
        # the telemetry connection proves the file's token (the worker refuses any client without it)
        await until(pilot, lambda: w.endpoint in live.panels and bool(live.panels[w.endpoint].status.up),
                    "the worker up")
        await pilot.press("f1", "ctrl+l")
        await settle(app, pilot)
        assert app.placement.load_note.startswith("✓ loaded"), app.placement.load_note


def test_app_takes_the_model_flags(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", SynthSpec(layers=2, dense_layers=1, seed=1))  # -m must be readable
    app = app_from_args(_parser().parse_args(["-m", str(model), "-t", "1", "--float-activations"]))
    assert app.local is None and app.shared.options == {"threads": 1, "float_activations": True}
    assert app_from_args(_parser().parse_args(["-m", str(model)])).shared.options == {}


def test_a_hosts_file_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[[host]]\nname = "box1"\nssh = "me@10.0.0.2"\n')
    app = app_from_args(_parser().parse_args(["--hosts", str(hosts)]))
    assert app.local is None and [h.name for h in app.board.hosts] == ["box1"]
    assert app.board.cluster_file == Path(os.environ["IKCTL_CACHE"]) / "tui-cluster.json"
    assert app.placement.flags.rpc == ""

    assert main(["--cluster", str(tmp_path / "missing.json")]) == 1
    assert capsys.readouterr().err.startswith(f"ikctl: error: cluster file {tmp_path / 'missing.json'} not found")
    hosts.write_text("[[host]]\nport_range = [1, 2]\n")
    assert main(["--hosts", str(hosts)]) == 1
    assert "field 'port_range'" in capsys.readouterr().err
    assert main(["-ot", "exps(=CPU"]) == 1  # a bad flag is reported before any worker starts
    err = capsys.readouterr().err
    assert "not a valid regex" in err and "starting" not in err
