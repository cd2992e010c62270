"""The schema rules for single events, one event at a time: what ``freshet.eventcolumns.row_problems``
computes on whole columns is checked against them."""

from __future__ import annotations

from freshet.events.v1 import events_pb2


def validate_impression(imp: events_pb2.Impression) -> str | None:
    """The reason an impression violates the schema, or ``None``."""
    if not imp.request_id:
        return "impression without request_id"
    if imp.user_id < 0 or imp.item_id < 0:
        return f"negative id (user {imp.user_id}, item {imp.item_id})"
    if imp.position < 0:
        return f"negative position {imp.position}"
    return None


def validate_action(action: events_pb2.Action) -> str | None:
    """The reason an action violates the schema, or ``None``."""
    if not action.request_id:
        return "action without request_id"
    if action.item_id < 0:
        return f"negative item id {action.item_id}"
    if action.type == events_pb2.ACTION_TYPE_UNSPECIFIED:
        return "action type unspecified"
    return None
