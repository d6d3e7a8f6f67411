"""What an operator sees of a conversation in the Temporal UI: the recent transcript as the workflow's current
details, and the workflow's metrics. Workflow code."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from schemas.turn import TRANSCRIPT_LINE_CHARS, TRANSCRIPT_LINES_KEPT, CompanionState


def add_transcript(state: CompanionState, lines: list[str]) -> None:
    """Lines added to the transcript the state keeps (its last few), shown as the workflow's current details."""
    state.transcript = [*state.transcript, *lines][-TRANSCRIPT_LINES_KEPT:]
    workflow.set_current_details("\n\n".join(state.transcript))


def clip(text: str) -> str:
    """One line, at most TRANSCRIPT_LINE_CHARS long."""
    flat = " ".join(text.split())
    return flat if len(flat) <= TRANSCRIPT_LINE_CHARS else flat[:TRANSCRIPT_LINE_CHARS - 1] + "…"


def count(name: str, description: str, value: int = 1, **attributes: str) -> None:
    """Add to a workflow metric (not emitted again when a history is replayed)."""
    workflow.metric_meter().create_counter(name, description).add(value, attributes)
