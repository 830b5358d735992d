"""Small things several stage tests share: a stop control driven by the events, the losses."""


class StopAt:
    """A control that asks to stop once the sink has seen a metrics event at `step` or later."""

    def __init__(self, events: list, step: int):
        self.events, self.step = events, step

    def should_stop(self) -> bool:
        return any(e.get("type") == "metrics" and e.get("step", 0) >= self.step for e in self.events)


def losses(events) -> dict[int, float]:
    """train/loss by step."""
    return {e["step"]: e["train/loss"] for e in events if e["type"] == "metrics" and "train/loss" in e}


def metrics(events) -> dict[int, dict]:
    """Each step's metrics event."""
    return {e["step"]: e for e in events if e["type"] == "metrics"}
