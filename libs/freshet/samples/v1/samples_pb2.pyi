from freshet.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SampleBatch(_message.Message):
    __slots__ = ("fids", "lengths", "labels", "weights", "sample_ids", "event_time_ms", "user_ids", "item_ids", "label_vectors", "versions")
    FIDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    LABEL_VECTORS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    fids: _tensor_pb2.Tensor
    lengths: _tensor_pb2.Tensor
    labels: _tensor_pb2.Tensor
    weights: _tensor_pb2.Tensor
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    event_time_ms: _tensor_pb2.Tensor
    user_ids: _tensor_pb2.Tensor
    item_ids: _tensor_pb2.Tensor
    label_vectors: _tensor_pb2.Tensor
    versions: _tensor_pb2.Tensor
    def __init__(self, fids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., lengths: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., sample_ids: _Optional[_Iterable[str]] = ..., event_time_ms: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., user_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., item_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., label_vectors: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., versions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
