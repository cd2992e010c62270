from freshet.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ActionType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_TYPE_UNSPECIFIED: _ClassVar[ActionType]
    ACTION_TYPE_CLICK: _ClassVar[ActionType]
    ACTION_TYPE_LIKE: _ClassVar[ActionType]
    ACTION_TYPE_SHARE: _ClassVar[ActionType]
    ACTION_TYPE_DWELL: _ClassVar[ActionType]
ACTION_TYPE_UNSPECIFIED: ActionType
ACTION_TYPE_CLICK: ActionType
ACTION_TYPE_LIKE: ActionType
ACTION_TYPE_SHARE: ActionType
ACTION_TYPE_DWELL: ActionType

class Impression(_message.Message):
    __slots__ = ("request_id", "user_id", "item_id", "position", "event_time_ms", "context")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: int
    item_id: int
    position: int
    event_time_ms: int
    context: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[int] = ..., item_id: _Optional[int] = ..., position: _Optional[int] = ..., event_time_ms: _Optional[int] = ..., context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("request_id", "item_id", "type", "value", "event_time_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: int
    type: ActionType
    value: float
    event_time_ms: int
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[int] = ..., type: _Optional[_Union[ActionType, str]] = ..., value: _Optional[float] = ..., event_time_ms: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("impression", "action")
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    impression: Impression
    action: Action
    def __init__(self, impression: _Optional[_Union[Impression, _Mapping]] = ..., action: _Optional[_Union[Action, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class EventColumns(_message.Message):
    __slots__ = ("kinds", "request_index", "request_ids", "item_ids", "user_ids", "positions", "event_time_ms", "action_types", "values", "context_index", "contexts")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ACTION_TYPES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    kinds: _tensor_pb2.Tensor
    request_index: _tensor_pb2.Tensor
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    item_ids: _tensor_pb2.Tensor
    user_ids: _tensor_pb2.Tensor
    positions: _tensor_pb2.Tensor
    event_time_ms: _tensor_pb2.Tensor
    action_types: _tensor_pb2.Tensor
    values: _tensor_pb2.Tensor
    context_index: _tensor_pb2.Tensor
    contexts: _containers.RepeatedCompositeFieldContainer[EventContext]
    def __init__(self, kinds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., request_index: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., request_ids: _Optional[_Iterable[str]] = ..., item_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., user_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., positions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., event_time_ms: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., action_types: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., context_index: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., contexts: _Optional[_Iterable[_Union[EventContext, _Mapping]]] = ...) -> None: ...

class EventContext(_message.Message):
    __slots__ = ("names", "values")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...
