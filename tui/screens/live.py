"""Live screen: one panel per worker, redrawn about once a second from the telemetry monitor's latest statuses."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from rpcnode.protocol import rpc_device
from tui.layer_map import device_tags
from tui.link_stats import LinkMonitor
from tui.shared_model import SharedModel
from tui.telemetry import INTERVAL_S, TelemetryMonitor
from tui.widgets.device_colors import device_colors
from tui.widgets.mode_tabs import ModeTabs
from tui.widgets.worker_panel import WorkerPanel

NO_WORKERS = ("No workers to watch. Start ikctl with nothing for two local workers, or with --rpc, --cluster FILE "
              "or --hosts FILE (then launch them on Hosts, F5).")


class LiveScreen(Screen[None]):
    """Owns one WorkerPanel per watched worker; polling runs in the monitor's threads, this only renders."""

    CSS_PATH = "live.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("p", "pause", "Pause")]

    def __init__(self, monitor: TelemetryMonitor, refresh_s: float = INTERVAL_S,
                 shared: SharedModel | None = None) -> None:
        super().__init__()
        self.monitor = monitor
        self.refresh_s = refresh_s
        self.shared = shared  # the app's model: its round trips to each worker (the panels' link line)
        self.links = LinkMonitor()
        self.paused = False
        self.panels: dict[str, WorkerPanel] = {}

    def compose(self) -> ComposeResult:
        yield ModeTabs("live")
        yield Static("", id="live-status")
        yield VerticalScroll(id="live-panels")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(self.refresh_s, self.refresh_panels)
        self.refresh_panels()

    def on_screen_resume(self) -> None:
        self.refresh_panels()  # at once, not up to a second after switching here

    def refresh_panels(self) -> None:
        """Render the newest status of every watched worker; panels come and go with the watched set."""
        if self.paused or not self.is_mounted:
            return
        latest = self.monitor.latest()
        links = self.links.update(self.shared.model if self.shared is not None else None)
        for ep in [ep for ep in self.panels if ep not in latest]:
            self.panels.pop(ep).remove()
        names = [rpc_device(ep) for ep in latest]
        tags, colors = device_tags(names), device_colors(["CPU", *names])
        container = self.query_one("#live-panels", VerticalScroll)
        for ep, status in latest.items():
            panel = self.panels.get(ep)
            if panel is None:
                panel = self.panels[ep] = WorkerPanel(status, tags[status.device], colors[status.device])
                container.mount(panel)
            else:
                panel.status = status
            panel.link = links.get(status.device)
        n_up = sum(s.up for s in latest.values())
        status_line = (f"{len(latest)} workers, {n_up} up · every {self.refresh_s:g} s · p pauses" if latest
                       else NO_WORKERS)
        self.query_one("#live-status", Static).update(status_line)

    def action_pause(self) -> None:
        """Freeze the panels to read them (polling and history go on)."""
        self.paused = not self.paused
        self.query_one("#live-status", Static).update("paused · p resumes" if self.paused else "")
        self.refresh_panels()
