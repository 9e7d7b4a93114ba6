"""Editable placement flags (-ot, -ngl, -ts, --rpc, --device-mem); posts FlagsEdited on every change."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, TextArea

from tui.messages import FlagsEdited
from tui.plan_flags import PlanFlags

FIELDS = (("rpc", "--rpc", "host:port,host:port"), ("n_gpu_layers", "-ngl", "0"),
          ("tensor_split", "-ts", "e.g. 3,1"), ("device_mem", "--device-mem", "DEV=SIZE …"))


class PlacementForm(Vertical):
    """The form; `flags` is what it shows at start. Reading the widgets gives the current flags."""

    DEFAULT_CSS = """
    PlacementForm { height: auto; }
    PlacementForm .flag-row { height: 1; margin-bottom: 1; }
    PlacementForm .flag-row Label { width: 13; }
    PlacementForm .flag-row Input { width: 1fr; }
    PlacementForm #ot { height: 5; }
    """

    def __init__(self, flags: PlanFlags, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.flags = flags

    def compose(self) -> ComposeResult:
        yield Label("-ot REGEX=DEV (one per line)")
        yield TextArea(self.flags.override_tensor, id="ot", compact=True, soft_wrap=False,
                       placeholder="e.g. exps=RPC[127.0.0.1:50052]")
        for name, flag, hint in FIELDS:
            with Horizontal(classes="flag-row"):
                yield Label(flag)
                yield Input(getattr(self.flags, name), placeholder=hint, id=name.replace("_", "-"), compact=True)

    def show(self, flags: PlanFlags) -> None:
        """Put `flags` in the fields (each change posts FlagsEdited as a typed edit would)."""
        self.query_one("#ot", TextArea).load_text(flags.override_tensor)
        for name, _, _ in FIELDS:
            self.query_one(f"#{name.replace('_', '-')}", Input).value = getattr(flags, name)

    def current(self) -> PlanFlags:
        values = {name: self.query_one(f"#{name.replace('_', '-')}", Input).value for name, _, _ in FIELDS}
        return PlanFlags(override_tensor=self.query_one("#ot", TextArea).text, **values)

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        event.stop()
        self.post_message(FlagsEdited(self.current()))

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(FlagsEdited(self.current()))
