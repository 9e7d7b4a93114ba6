"""Hosts screen: the inventory with probe results, each host's workers with their status, launch and stop per host,
and the tail of the selected worker's log."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.coordinate import Coordinate
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from rpcnode.protocol import rpc_device
from tui.formatting import printable
from tui.host_board import LOG_LINES, HostBoard, WorkerEntry, host_cells
from tui.inventory import Host
from tui.messages import HostLaunched, HostsProbed, HostStopped, LogTail, WorkersChanged, WorkFailed
from tui.screens.confirm import Confirm
from tui.ssh import HostError, NewHostKey
from tui.telemetry import TelemetryMonitor
from tui.widgets.mode_tabs import ModeTabs

HOST_COLUMNS = ("HOST", "STATUS", "CPU", "RAM tot/free", "GPUS", "WORKERS")
WORKER_COLUMNS = ("HOST", "DEVICE", "ENDPOINT", "PID", "STATUS")
REFRESH_S = 1.0
NO_HOSTS = "No hosts: start ikctl with --hosts FILE (see examples/hosts.toml), or with nothing for local workers."


class HostsScreen(Screen[None]):
    """Owns the host board's view: which host and worker are selected, what is being launched or stopped."""

    CSS_PATH = "hosts.tcss"
    AUTO_FOCUS = "#hosts-table"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("l", "launch", "Launch"),
        Binding("s", "stop_host", "Stop"),
        Binding("r", "probe", "Probe"),
        Binding("k", "trust_key", "Trust key"),
    ]

    def __init__(self, board: HostBoard, monitor: TelemetryMonitor) -> None:
        super().__init__()
        self.board = board
        self.monitor = monitor
        self.busy: dict[str, str] = {}  # host name -> "launching…" / "stopping…"
        self.log_endpoint: str | None = None
        self.log_lines: list[str] = []

    def compose(self) -> ComposeResult:
        yield ModeTabs("hosts")
        yield Static("", id="hosts-status")
        hosts: DataTable[str] = DataTable(id="hosts-table", cursor_type="row")
        hosts.add_columns(*HOST_COLUMNS)
        yield hosts
        workers: DataTable[str] = DataTable(id="workers-table", cursor_type="row")
        workers.add_columns(*WORKER_COLUMNS)
        yield workers
        yield Static("", id="log-title")
        with VerticalScroll(id="log-scroll"):
            yield Static("", id="log-tail")
        yield Footer()

    def on_mount(self) -> None:
        self.show_hosts()
        self.show_workers()
        self.set_interval(REFRESH_S, self.tick)
        if self.board.hosts:
            self.action_probe()

    def tick(self) -> None:
        """Worker states follow telemetry; a local worker's log is cheap to read again."""
        if not self.is_current:
            return
        self.show_workers()
        entry = self.selected_worker()
        if entry is not None and entry.local is not None:
            self.read_log(entry)

    # ---- selection -------------------------------------------------------------------------------------------
    def selected_host(self) -> Host | None:
        table = self.query_one("#hosts-table", DataTable)
        if not self.board.hosts or table.row_count == 0:
            return None
        return self.board.hosts[min(table.cursor_row, len(self.board.hosts) - 1)]

    def selected_worker(self) -> WorkerEntry | None:
        table = self.query_one("#workers-table", DataTable)
        entries = self.board.workers()
        if not entries or table.row_count == 0:
            return None
        return entries[min(table.cursor_row, len(entries) - 1)]

    @on(DataTable.RowHighlighted, "#workers-table")
    def worker_highlighted(self) -> None:
        entry = self.selected_worker()
        if entry is not None and entry.endpoint != self.log_endpoint:
            self.log_endpoint, self.log_lines = entry.endpoint, ["reading…"]
            self.show_log(entry)
            self.read_log(entry)

    # ---- rendering -------------------------------------------------------------------------------------------
    def show_hosts(self) -> None:
        rows = []
        for h in self.board.hosts:
            n = sum(1 for e in self.board.workers(h) if e.local is None or e.local.running)
            rows.append(host_cells(h, self.board.probes.get(h.name), n, self.busy.get(h.name)))
        # rebuilt with its columns, so that their widths follow the text ("probing…" is wider than "ok")
        fill(self.query_one("#hosts-table", DataTable), rows, columns=HOST_COLUMNS)
        status = self.query_one("#hosts-status", Static)
        errors = [f"{name}: {why}" for name, why in self.board.errors.items()]
        errors += [f"{h.name}: its host key is not known here: k shows the key, to check and trust it"
                   for h in self.board.hosts if self.board.unknown_key(h)]
        status.update(("l launches workers on the selected host · s stops them · r probes again"
                       if self.board.hosts else NO_HOSTS) + "".join(f"\n✗ {e}" for e in errors))

    def show_workers(self) -> None:
        latest = self.monitor.latest()
        fill(self.query_one("#workers-table", DataTable),
             [(e.host, e.device, e.endpoint, str(e.pid or "-"), e.state(latest.get(e.endpoint)))
              for e in self.board.workers()])

    def show_log(self, entry: WorkerEntry) -> None:
        self.query_one("#log-title", Static).update(
            f"log of {entry.endpoint} ({entry.host}, {entry.device}): {entry.log or '-'}")
        self.query_one("#log-tail", Static).update(Text(printable("\n".join(self.log_lines))))
        self.query_one("#log-scroll", VerticalScroll).scroll_end(animate=False)

    # ---- work ------------------------------------------------------------------------------------------------
    def action_probe(self) -> None:
        self.probe_hosts()

    @work(name="probe-hosts", exclusive=True, group="hosts-probe")
    async def probe_hosts(self) -> None:
        self.post_message(HostsProbed(await self.board.probe()))

    @on(HostsProbed)
    def hosts_probed(self) -> None:
        self.show_hosts()

    def action_launch(self) -> None:
        host = self.selected_host()
        if host is None:
            self.notify(NO_HOSTS, severity="warning")
            return
        if host.name in self.busy:
            self.notify(f"{host.name}: {self.busy[host.name]}", severity="warning")
            return
        self.busy[host.name] = "launching…"
        self.show_hosts()
        self.launch_on(host)

    @work(name="launch", group="hosts-launch")
    async def launch_on(self, host: Host) -> None:
        try:
            entries = await self.board.launch(host)
        except HostError as e:
            self.post_message(HostLaunched(host.name, [], str(e)))
            return
        self.post_message(HostLaunched(host.name, entries))

    @on(HostLaunched)
    def host_launched(self, event: HostLaunched) -> None:
        self.busy.pop(event.host, None)
        self.show_hosts()
        self.show_workers()
        if event.error is not None:
            self.post_message(WorkFailed(f"{event.host}: {event.error}"))
            return
        entries: list[WorkerEntry] = event.entries
        tokens = {e.endpoint: e.launched.token for e in entries if e.launched is not None}
        capacities = {rpc_device(e.endpoint): e.launched.mem_bytes for e in entries if e.launched is not None}
        self.post_message(WorkersChanged([e.endpoint for e in entries], [], tokens, capacities))
        where = f"; `ikctl stop --cluster {self.board.cluster_file}` stops them" \
            if self.board.cluster_file and tokens else ""
        self.notify(f"{event.host}: started {', '.join(e.endpoint for e in entries)}{where}", title="launched")

    def action_stop_host(self) -> None:
        host = self.selected_host()
        if host is None or host.name in self.busy:
            return
        if not [e for e in self.board.workers(host) if e.local is None or e.local.running]:
            self.notify(f"{host.name}: no running workers", severity="warning")
            return
        self.busy[host.name] = "stopping…"
        self.show_hosts()
        self.stop_on(host)

    @work(name="stop", group="hosts-stop")
    async def stop_on(self, host: Host) -> None:
        self.post_message(HostStopped(host.name, await self.board.stop(host)))

    @on(HostStopped)
    def host_stopped(self, event: HostStopped) -> None:
        self.busy.pop(event.host, None)
        self.show_hosts()
        self.show_workers()
        results: list[tuple[WorkerEntry, str]] = event.results
        gone = [e.endpoint for e, status in results if status.startswith(("stopped", "killed", "not running"))]
        failed = [f"{e.endpoint}: {status}" for e, status in results if e.endpoint not in gone]
        self.post_message(WorkersChanged([], gone, {}, {}))
        self.notify(f"{event.host}: stopped {len(gone)} of {len(results)} workers" +
                    "".join(f"\n{f}" for f in failed), severity="warning" if failed else "information")

    def action_trust_key(self) -> None:
        host = self.selected_host()
        if host is None or not self.board.unknown_key(host):
            self.notify("k is for a host whose key is not known here (its status says so)", severity="warning")
            return
        self.fetch_key(host)

    @work(name="host-key", exclusive=True, group="hosts-key")
    async def fetch_key(self, host: Host) -> None:
        try:
            new = await self.board.host_key(host)
        except HostError as e:
            self.post_message(WorkFailed(f"{host.name}: {e}"))
            return
        text = (f"{host.name} ({new.host}, port {new.port}) presents this {new.algorithm} key:\n\n"
                f"  {new.fingerprint}\n\nTrust it only if it is that host's: on the host, "
                "`ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` prints its fingerprints.")
        self.app.push_screen(Confirm(text, [("t", "Trust it"), ("c", "Cancel")]),
                             lambda answer: self.key_answered(answer, new))

    def key_answered(self, answer: str | None, new: NewHostKey) -> None:
        if answer != "t":
            return
        try:
            path = self.board.trust(new)
        except HostError as e:
            self.notify(str(e), severity="error", timeout=10)
            return
        self.notify(f"added {new.host}'s key to {path}", title="trusted")
        self.action_probe()

    @work(name="log-tail", exclusive=True, group="hosts-log")
    async def read_log(self, entry: WorkerEntry) -> None:
        self.post_message(LogTail(entry.endpoint, await self.board.log_tail(entry, LOG_LINES)))

    @on(LogTail)
    def log_read(self, event: LogTail) -> None:
        entry = self.selected_worker()
        if entry is None or entry.endpoint != event.endpoint:
            return
        self.log_lines = event.lines
        self.show_log(entry)


def fill(table: DataTable[str], rows: list[tuple[str, ...]], columns: tuple[str, ...] = ()) -> None:
    """Show `rows`: cells updated in place while the rows stay the same (cursor and scroll kept), else rebuilt
    (with `columns` when given)."""
    if not columns and table.row_count == len(rows):
        for i, row in enumerate(rows):
            for j, cell in enumerate(row):
                if table.get_cell_at(Coordinate(i, j)) != cell:
                    table.update_cell_at(Coordinate(i, j), cell, update_width=True)
        return
    cursor = table.cursor_row
    table.clear(columns=bool(columns))
    if columns:
        table.add_columns(*columns)
    for row in rows:
        table.add_row(*row)
    if rows:
        table.move_cursor(row=min(cursor, len(rows) - 1))
