"""The row of mode tabs at the top of each screen; a click asks the app to switch mode."""

from __future__ import annotations

from textual.widgets import Tab, Tabs

from tui.messages import SwitchTo
from tui.modes import MODES


class ModeTabs(Tabs):
    """Tabs for every mode with `mode` active."""

    def __init__(self, mode: str) -> None:
        super().__init__(*(Tab(m.label, id=f"tab-{m.name}") for m in MODES if m.tab), active=f"tab-{mode}")
        self.mode = mode
        self.can_focus = False  # keyboard users switch with F1-F5; focus stays in the form

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        event.stop()
        mode = (event.tab.id or "").removeprefix("tab-")
        if mode and mode != self.mode:
            self.post_message(SwitchTo(mode))
            self.active = f"tab-{self.mode}"  # this screen's tab stays lit; the target screen lights its own
